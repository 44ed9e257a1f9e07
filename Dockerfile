# syntax=docker/dockerfile:1
FROM rust:1.89-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake clang libclang-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin voxgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates espeak-ng \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/voxgate voxgate
COPY --from=build /src/target/release/voxgate /usr/local/bin/voxgate
USER voxgate
WORKDIR /var/lib/voxgate
ENV VOXGATE_BIND=0.0.0.0:8080 \
    VOXGATE_LOG__FORMAT=json \
    DATABASE_URL=sqlite:///var/lib/voxgate/voxgate.db
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["voxgate"]
CMD ["serve"]
