# The device host as a container image (the template's ECS service runs it).
# Build from the repository root:  docker build -f infra/device-host.Dockerfile -t wabcast-host .
# No container engine runs where wabcast is developed, so this file is not built there; its one
# build step is the exact command infra/test.sh runs in CI (a test checks they stay the same).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p device-host

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data wabcast \
 && mkdir -p /data && chown wabcast /data
COPY --from=build /src/target/release/device-host /usr/local/bin/device-host
USER 10001
ENV HOST_BIND=0.0.0.0:8700 HOST_DATA_DIR=/data LOG_FORMAT=json
VOLUME /data
EXPOSE 8700
HEALTHCHECK --interval=15s --timeout=5s CMD ["/usr/local/bin/device-host", "--healthcheck"]
ENTRYPOINT ["/usr/local/bin/device-host"]
