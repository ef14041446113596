FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN useradd --system --home /var/lib/credbroker credbroker && mkdir -p /var/lib/credbroker && chown credbroker /var/lib/credbroker
COPY --from=build /src/target/release/credbroker /usr/local/bin/credbroker
USER credbroker
WORKDIR /etc/credbroker
ENTRYPOINT ["credbroker"]
