# herald's container image: the operator binary on a minimal, non-root runtime.
#
#   docker build -t ghcr.io/herald-dev/herald:0.1.0 .
#
# The Helm chart (charts/herald) runs it as `herald run`, as user 65532
# (distroless's "nonroot") with a read-only root filesystem.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Cargo checks that every declared target exists, the bench included.
COPY benches ./benches
COPY src ./src
RUN cargo build --release --locked --bin herald

# glibc, libgcc and CA certificates; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/herald /usr/local/bin/herald
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/herald"]
CMD ["run"]
