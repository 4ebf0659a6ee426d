# berth container image.
#
#   docker build -t berth:dev .
#   docker run --rm -p 5000:5000 -p 9090:9090 -v berth-cache:/var/lib/berth berth:dev
#
# Build stage: the release binary, built from the locked dependency set.
# BuildKit (the default builder) keeps the cargo registry and target dir in cache mounts so a
# source change does not rebuild every dependency.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -D -m 0755 target/release/berth /out/usr/local/bin/berth \
 && install -d -m 0750 -o 65532 -g 65532 /out/var/lib/berth

# Runtime stage: glibc + libgcc + CA certificates, no shell, uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/berth /usr/local/bin/berth
COPY --from=build --chown=65532:65532 /out/var/lib/berth /var/lib/berth
COPY config/container.toml /etc/berth/berth.toml
USER 65532:65532
VOLUME ["/var/lib/berth"]
# 5000: registry API (server.listen); 9090: /healthz, /readyz, /metrics (server.admin_listen).
EXPOSE 5000 9090
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve", "--config", "/etc/berth/berth.toml"]
