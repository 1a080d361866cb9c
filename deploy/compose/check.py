#!/usr/bin/env python3
"""`make compose-check`: build the images here and run the local stack end to end on the CPU.

What it does, in order (docs/deployment.md, "Checking the stack on this machine"):

1. builds the images on the local Debian base of `make image-base` (no Docker
   Hub): `service`, `trainer` and `tools` from deploy/docker/Dockerfile, and
   Redis from deploy/docker/redis.Dockerfile; `--network host` for the builds only;
2. brings up Redis and one generator with the CPU override and
   deploy/compose/check.yml, whose `model` service first trains a tiny DDPM
   with `clsp diffusion train` into the model volume; waits for every health check;
3. scales the generators to two and checks that both report the same model
   fingerprint on GET /v1/model (through their loopback ports);
4. runs the trainer service for one short epoch on digits, its positives from
   `dns+http://generator:8000` (every replica, found through the service name's DNS);
5. checks that the trainer exited 0 with a positive fraction above zero in
   /out/metrics.jsonl, and that Redis holds cached positives (`clsp:*` keys);
6. scales the generators back to one;
7. `docker-compose down -v`, and checks that no container, network or volume it
   created is left.

Standard library only, so that the host needs python3 and Docker's tools but
not the project's virtual environment. It needs a running engine:
deploy/docker/with-dockerd.sh starts one when there is none (the make target
does). Knobs of the stack: deploy/compose/check.env.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / "deploy" / "compose" / "check.env"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml", "deploy/compose/check.yml")
DOCKERFILE = "deploy/docker/Dockerfile"
REDIS_DOCKERFILE = ROOT / "deploy" / "docker" / "redis.Dockerfile"
LOG_DIR = ROOT / "build" / "compose-check"
# Variables of the caller's shell that would override check.env in compose.
_COMPOSE_ENV_PREFIXES = ("CLSP_", "REDIS_", "MODEL_DIR", "COMPOSE_")


class CheckFailed(Exception):
    """A step of the check did not hold; the message says which and why."""


@dataclass
class Timings:
    """Wall-clock seconds per step, printed at the end (docs/deployment.md records them)."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        print(f"\n== {name}", flush=True)
        start = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - start
            self.steps.append((name, took))
            print(f"   ({took:.1f} s)", flush=True)

    def report(self) -> str:
        width = max(len(name) for name, _ in self.steps)
        lines = [f"  {name:<{width}}  {took:7.1f} s" for name, took in self.steps]
        total = sum(took for _, took in self.steps)
        return "\n".join([*lines, f"  {'total':<{width}}  {total:7.1f} s"])


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as compose reads them (no quotes or expansion in check.env)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    stdin: bytes | None = None,
    log: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command; its output goes to ``log`` when given (the tail is shown on failure)."""
    out = log.open("wb") if log else subprocess.PIPE
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=ROOT,
            env=env,
            input=stdin,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    if check and proc.returncode != 0:
        text = log.read_bytes() if log else (proc.stdout or b"")
        tail = "\n".join(text.decode(errors="replace").splitlines()[-30:])
        where = f" (log: {log})" if log else ""
        raise CheckFailed(f"`{shlex.join(cmd)}` exited {proc.returncode}{where}:\n{tail}")
    return proc


class Stack:
    """docker-compose on the check's project, files and env file, in a clean environment."""

    def __init__(self, project: str) -> None:
        self.project = project
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(_COMPOSE_ENV_PREFIXES)}
        self.knobs = read_env_file(ENV_FILE)

    def compose(self, *args: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
        cmd = ["docker-compose", "--project-name", self.project, "--project-directory", str(ROOT)]
        cmd += ["--env-file", str(ENV_FILE)]
        for f in COMPOSE_FILES:
            cmd += ["-f", str(ROOT / f)]
        kwargs.setdefault("timeout", 600)
        return run([*cmd, *args], env=self.env, **kwargs)

    def out(self, *args: str, timeout: float = 120) -> str:
        return self.compose(*args, timeout=timeout).stdout.decode()

    def image(self, target: str) -> str:
        return f"{self.knobs['CLSP_IMAGE_PREFIX']}-{target}:{self.knobs['CLSP_IMAGE_TAG']}"

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers, running or not, oldest replica first."""
        ids = self.out("ps", "-a", "-q", service).split()
        if not ids:
            return []
        fmt = '{{index .Config.Labels "com.docker.compose.container-number"}} {{.Id}}'
        lines = docker("inspect", "--format", fmt, *ids).splitlines()
        return [cid for _, cid in sorted(line.split() for line in lines)]


def docker(*args: str, timeout: float = 120) -> str:
    return run(["docker", *args], timeout=timeout).stdout.decode()


def project_resources(project: str) -> dict[str, set[str]]:
    """Containers, networks and volumes that carry the compose project's label."""
    label = f"label=com.docker.compose.project={project}"
    return {
        "containers": set(docker("ps", "-a", "-q", "--filter", label).split()),
        "networks": set(docker("network", "ls", "-q", "--filter", label).split()),
        "volumes": set(docker("volume", "ls", "-q", "--filter", label).split()),
    }


def all_resources() -> dict[str, set[str]]:
    """Every container, network and volume of the engine, to diff before and after."""
    return {
        "containers": set(docker("ps", "-a", "-q", "--no-trunc").split()),
        "networks": set(docker("network", "ls", "-q", "--no-trunc").split()),
        "volumes": set(docker("volume", "ls", "-q").split()),
    }


# --- steps ---------------------------------------------------------------------


def build_images(stack: Stack, base: str, torch_spec: str) -> None:
    """The three targets of the Dockerfile and the Redis image, on the local base."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    env.setdefault("DOCKER_BUILDKIT", "0")  # no buildx plugin needed: the classic builder
    common = ["docker", "build", "--force-rm", "--network", "host"]
    common += ["--build-arg", f"BASE_IMAGE={base}"]
    for target in ("service", "trainer", "tools"):
        start = time.monotonic()
        run(
            [
                *common,
                "--build-arg",
                f"TORCH_SPEC={torch_spec}",
                "-f",
                DOCKERFILE,
                "--target",
                target,
                "-t",
                stack.image(target),
                ".",
            ],
            env=env,
            log=LOG_DIR / f"build-{target}.log",
            timeout=3600,
        )
        print(f"   {stack.image(target)} ({time.monotonic() - start:.1f} s)", flush=True)
    start = time.monotonic()
    redis = stack.knobs["REDIS_IMAGE"]
    run(
        [*common, "-t", redis, "-"],
        env=env,
        stdin=REDIS_DOCKERFILE.read_bytes(),
        log=LOG_DIR / "build-redis.log",
        timeout=1800,
    )
    print(f"   {redis} ({time.monotonic() - start:.1f} s)", flush=True)


def wait_healthy(stack: Stack, service: str, count: int, timeout: float) -> list[str]:
    """Wait until ``count`` containers of ``service`` report healthy; their ids."""
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        ids = stack.containers(service)
        fmt = "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"
        states = docker("inspect", "--format", fmt, *ids).splitlines() if ids else []
        if any(s.split()[0] in ("exited", "dead") or s.endswith("unhealthy") for s in states):
            raise CheckFailed(f"{service}: a container failed: {states}")
        if len(ids) == count and all(s.endswith(" healthy") for s in states):
            print(f"   {count} x {service} healthy", flush=True)
            return ids
        time.sleep(2)
    raise CheckFailed(f"{service}: not {count} healthy within {timeout:.0f} s: {states}")


def http_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def http_text(url: str, token: str) -> str:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def generator_urls(stack: Stack, count: int) -> list[str]:
    """Each replica's published port; the check insists that it is on loopback."""
    urls = []
    for index in range(1, count + 1):
        address = stack.out("port", "--index", str(index), "generator", "8000").strip()
        host, _, port = address.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            raise CheckFailed(f"generator {index} is published on {address!r}, not on loopback")
        urls.append(f"http://{address}")
    return urls


def served_positives(metrics_text: str) -> float:
    """clsp_positives_served_total from a /metrics page."""
    for line in metrics_text.splitlines():
        if line.startswith("clsp_positives_served_total "):
            return float(line.split()[1])
    return 0.0


def read_from_container(container: str, path: str) -> str:
    """A file of a (stopped) container, volumes included, through `docker cp`."""
    proc = run(["docker", "cp", f"{container}:{path}", "-"], timeout=120)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        member = tar.next()
        if member is None or (data := tar.extractfile(member)) is None:
            raise CheckFailed(f"{container}:{path} is not a file")
        return data.read().decode()


def scale_generators(stack: Stack, replicas: int) -> None:
    """`up --scale`, touching neither the other services nor the running replicas."""
    scale = f"generator={replicas}"
    stack.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", scale, "generator")


def check_stack(stack: Stack, timings: Timings, trainer_timeout: float) -> None:
    token = stack.knobs["CLSP_API_TOKEN"]
    with timings.step("up: redis, the model (clsp diffusion train), a generator"):
        stack.compose("up", "-d", "generator", log=LOG_DIR / "up.log", timeout=1800)
        model = stack.containers("model")
        code = docker("inspect", "--format", "{{.State.ExitCode}}", *model).strip()
        if code != "0":
            raise CheckFailed(f"the model service exited {code}")
        print("   " + stack.out("logs", "--no-color", "model").strip().splitlines()[-1])
        wait_healthy(stack, "redis", 1, timeout=60)
        wait_healthy(stack, "generator", 1, timeout=600)

    with timings.step("scale to two generators: one model fingerprint"):
        scale_generators(stack, 2)
        wait_healthy(stack, "generator", 2, timeout=600)
        urls = generator_urls(stack, 2)
        fingerprints = [http_json(f"{url}/v1/model", token)["fingerprint"] for url in urls]
        print(f"   GET /v1/model: {fingerprints}")
        if not fingerprints[0] or len(set(fingerprints)) != 1:
            raise CheckFailed(f"the generators disagree on the model: {fingerprints}")

    with timings.step("trainer: one epoch, positives from dns+http://generator:8000"):
        stack.compose("up", "-d", "--no-deps", "trainer", timeout=300)
        (trainer,) = stack.containers("trainer")
        code = run(["docker", "wait", trainer], timeout=trainer_timeout).stdout.decode().strip()
        logs = stack.out("logs", "--no-color", "trainer").strip().splitlines()
        print("\n".join("   " + line for line in logs[-8:] if not line.startswith("Attaching")))
        if code != "0":
            raise CheckFailed(f"the trainer exited {code}")

    with timings.step("checks: positive fraction, positives cached in Redis"):
        records = [
            json.loads(line)
            for line in read_from_container(trainer, "/out/metrics.jsonl").splitlines()
            if line.strip()
        ]
        epochs = [r for r in records if "positive_fraction" in r]
        if not epochs:
            raise CheckFailed(f"no epoch record with a positive_fraction: {records}")
        fraction = epochs[-1]["positive_fraction"]
        print(f"   positive fraction of the last epoch: {fraction:.2f}")
        if not fraction > 0:
            raise CheckFailed(f"the trainer got no positives (positive fraction {fraction})")
        keys = stack.out("exec", "-T", "redis", "redis-cli", "--scan", "--pattern", "clsp:*")
        cached = len(keys.split())
        print(f"   Redis holds {cached} cached positives (clsp:* keys)")
        if cached == 0:
            raise CheckFailed("Redis holds no cached positive")
        served = [served_positives(http_text(f"{url}/metrics", token)) for url in urls]
        print(f"   positives served per generator: {[int(s) for s in served]}")

    with timings.step("scale back to one generator"):
        scale_generators(stack, 1)
        wait_healthy(stack, "generator", 1, timeout=120)


def show_failure(stack: Stack) -> None:
    """What the containers said, for the failure's reader."""
    try:
        print(stack.out("ps", "-a"))
        for service in ("model", "redis", "generator", "trainer"):
            lines = stack.out("logs", "--no-color", service).strip().splitlines()
            print(f"--- {service} (last 20 lines)")
            print("\n".join(lines[-20:]))
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        print(f"(could not collect the logs: {exc})")


def tear_down(stack: Stack, before: dict[str, set[str]], timings: Timings) -> None:
    with timings.step("down -v: nothing of the stack is left"):
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300)
        left = {kind: ids for kind, ids in project_resources(stack.project).items() if ids}
        after = all_resources()
        new = {kind: after[kind] - before[kind] for kind in after if after[kind] - before[kind]}
        if left or new:
            raise CheckFailed(f"left behind: {left or new}")
        print("   no container, network or volume left")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="clspcheck", help="compose project name")
    parser.add_argument("--skip-build", action="store_true", help="use the images as they are")
    parser.add_argument("--keep", action="store_true", help="leave the stack up at the end")
    parser.add_argument("--trainer-timeout", type=float, default=900, help="seconds")
    args = parser.parse_args(argv)

    base = os.environ.get("DEBIAN_BASE_IMAGE", "clsp-positives-debian:bookworm")
    torch_spec = os.environ.get("TORCH_SPEC", "")
    stack = Stack(args.project)
    timings = Timings()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    if any(project_resources(stack.project).values()):
        print(f"removing what an earlier run of project {stack.project} left")
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300)
    before = all_resources()
    ok = False
    try:
        if not args.skip_build:
            with timings.step("build the images"):
                print(f"   on {base}, logs in {LOG_DIR.relative_to(ROOT)}/", flush=True)
                build_images(stack, base, torch_spec)
        check_stack(stack, timings, args.trainer_timeout)
        ok = True
    except (CheckFailed, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        show_failure(stack)
    finally:
        if args.keep:
            print(f"\nthe stack is still up (docker-compose --project-name {stack.project} ...)")
        else:
            try:
                tear_down(stack, before, timings)
            except (CheckFailed, subprocess.TimeoutExpired) as exc:
                print(f"\nFAILED: {exc}", file=sys.stderr)
                ok = False
    print("\n" + timings.report())
    print("\ncompose-check: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
