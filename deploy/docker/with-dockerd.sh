#!/usr/bin/env bash
# Run a command with a Docker engine: start dockerd when none answers (as
# root), and stop it again afterwards only if this script started it. Used by
# `make image-base` and `make compose-check` on machines where nothing keeps a
# daemon running (docs/deployment.md, "Checking the stack on this machine").
#
#   deploy/docker/with-dockerd.sh CMD [ARG...]
set -euo pipefail

if [ $# -eq 0 ]; then
  echo "usage: $0 CMD [ARG...]" >&2
  exit 2
fi
if ! command -v docker >/dev/null 2>&1; then
  echo "no docker client on PATH (Debian: apt-get install docker.io)" >&2
  exit 1
fi

started=""
log="${DOCKERD_LOG:-/tmp/clsp-dockerd.log}"
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ] || ! command -v dockerd >/dev/null 2>&1; then
    echo "no Docker engine answers, and this shell cannot start one (needs root and dockerd)" >&2
    exit 1
  fi
  echo "starting dockerd (log: $log)"
  dockerd >"$log" 2>&1 &
  started=$!
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    if ! kill -0 "$started" 2>/dev/null; then
      echo "dockerd exited at start; the end of its log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    sleep 1
  done
  docker info >/dev/null 2>&1 || { echo "dockerd did not answer within 60 s" >&2; exit 1; }
fi

stop_dockerd() {
  if [ -n "$started" ]; then
    echo "stopping the dockerd this script started"
    kill "$started" 2>/dev/null || true
    # dockerd stops its containers first; give it the time that takes.
    for _ in $(seq 60); do kill -0 "$started" 2>/dev/null || break; sleep 1; done
  fi
}
trap stop_dockerd EXIT
"$@"
