# Redis for the local stack where Docker Hub's redis:7 cannot be pulled:
# Debian's redis-server (7.0) on the local Debian base of `make image-base`.
# docker-compose.yml runs it when REDIS_IMAGE names it, as
# deploy/compose/check.env does. No build context is needed:
#
#   docker build -t clsp-positives-redis:latest - < deploy/docker/redis.Dockerfile
ARG BASE_IMAGE=clsp-positives-debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
# As in the official image: without a config file, Redis' protected mode would
# refuse every client but loopback ones; here the compose network is the fence.
RUN printf '%s\n' \
        '#!/bin/sh' \
        'if [ "$1" = redis-server ]; then shift; set -- redis-server --protected-mode no "$@"; fi' \
        'exec "$@"' \
        > /usr/local/bin/redis-entrypoint \
    && chmod 755 /usr/local/bin/redis-entrypoint
USER redis
WORKDIR /var/lib/redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/redis-entrypoint"]
CMD ["redis-server"]
