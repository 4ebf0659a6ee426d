#!/usr/bin/env bash
# Builds a berth container image on this machine without pulling any base image.
#
#   tests/image/build-local.sh BINARY TAG            # assemble a rootfs, `docker import` it as TAG
#   tests/image/build-local.sh --rootfs DIR BINARY   # only assemble the rootfs into DIR (no docker)
#
# The rootfs holds what the Dockerfile's runtime stage (distroless/cc, nonroot) holds:
#   /usr/local/bin/berth            the binary
#   the shared libraries `ldd BINARY` names, and the dynamic loader, at the paths ldd names
#   /etc/passwd, /etc/group         root and nonroot (65532:65532), /etc/nsswitch.conf
#   /etc/ssl/certs/ca-certificates.crt   from this machine
#   /etc/berth/berth.toml           config/container.toml
#   /var/lib/berth                  empty, owned by 65532:65532 (the cache volume)
#   /tmp                            1777
# and gets the same USER, ENTRYPOINT, CMD, EXPOSE and VOLUME as the Dockerfile's image.
#
# The docker daemon is the one DOCKER_HOST names (docker's own default when unset).
# Root is not needed: ownership is set in the tar stream, not on disk.
set -euo pipefail

usage() {
    echo "usage: $0 BINARY TAG | $0 --rootfs DIR BINARY" >&2
    exit 2
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
config="$repo/config/container.toml"
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

rootfs_only=""
if [[ ${1:-} == --rootfs ]]; then
    [[ $# -eq 3 ]] || usage
    rootfs_only=$2
    binary=$3
    tag=""
else
    [[ $# -eq 2 ]] || usage
    binary=$1
    tag=$2
fi

[[ -f $binary && -x $binary ]] || { echo "build-local: $binary is not an executable file" >&2; exit 1; }
[[ -f $config ]] || { echo "build-local: $config is missing" >&2; exit 1; }
[[ -f $ca_bundle ]] || { echo "build-local: no CA bundle at $ca_bundle (apt-get install ca-certificates)" >&2; exit 1; }
command -v ldd >/dev/null || { echo "build-local: ldd is missing" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -n $rootfs_only ]]; then
    mkdir -p "$rootfs_only"
    [[ -z $(ls -A "$rootfs_only") ]] || { echo "build-local: $rootfs_only is not empty" >&2; exit 1; }
    rootfs=$(cd "$rootfs_only" && pwd)
else
    rootfs=$work/rootfs
    mkdir "$rootfs"
fi

# --- the binary and what it links against -------------------------------------------------------
# On a merged-/usr host (/lib -> usr/lib, ...) the rootfs gets the same links, so a library that
# ldd names as /lib/... and that resolves to /usr/lib/... is stored once.
for d in bin sbin lib lib32 lib64 libx32; do
    if [[ -L /$d ]]; then
        target=$(readlink "/$d")
        case $target in
            /*) mkdir -p "$rootfs$target"; ln -s "${target#/}" "$rootfs/$d" ;;
            *) mkdir -p "$rootfs/$target"; ln -s "$target" "$rootfs/$d" ;;
        esac
    fi
done
install -D -m 0755 "$binary" "$rootfs/usr/local/bin/berth"

# copy_lib PATH: the file PATH resolves to, stored at its resolved path, and PATH as a link to it
# when the two differ (e.g. /lib64/ld-linux-x86-64.so.2), so either name works inside the image.
copy_lib() {
    local path=$1 real
    real=$(readlink -f "$path")
    [[ -f $real ]] || { echo "build-local: $path (from ldd) does not exist" >&2; exit 1; }
    if [[ ! -e $rootfs$real ]]; then
        mkdir -p "$rootfs$(dirname "$real")"
        cp "$real" "$rootfs$real"
    fi
    if [[ ! -e $rootfs$path && ! -L $rootfs$path ]]; then
        mkdir -p "$rootfs$(dirname "$path")"
        ln -s "$real" "$rootfs$path"
    fi
}

ldd_out=$(ldd "$binary" 2>&1) || true
if grep -q -e 'not a dynamic executable' -e 'statically linked' <<<"$ldd_out"; then
    echo "build-local: $binary is statically linked: no libraries to copy"
else
    if grep -q 'not found' <<<"$ldd_out"; then
        echo "build-local: ldd cannot resolve every library of $binary:" >&2
        echo "$ldd_out" >&2
        exit 1
    fi
    n=0
    while read -r line; do
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)"  or
        # "/lib64/ld-linux-x86-64.so.2 (0x...)"                    or  "linux-vdso.so.1 (0x...)"
        if [[ $line =~ =\>\ (/[^ ]+) ]]; then
            copy_lib "${BASH_REMATCH[1]}"
            n=$((n + 1))
        elif [[ $line =~ ^(/[^ ]+)\ \( ]]; then
            copy_lib "${BASH_REMATCH[1]}"
            n=$((n + 1))
        fi
    done <<<"$ldd_out"
    echo "build-local: copied $n shared objects named by ldd"
fi

# --- users, name resolution, CA certificates, config ---------------------------------------------
mkdir -p "$rootfs/etc/ssl/certs" "$rootfs/etc/berth" "$rootfs/var/lib/berth" "$rootfs/tmp" \
    "$rootfs/home/nonroot" "$rootfs/root"
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
EOF
cat >"$rootfs/etc/nsswitch.conf" <<'EOF'
passwd: files
group: files
hosts: files dns
EOF
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$rootfs/etc/hosts"
cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
cp "$config" "$rootfs/etc/berth/berth.toml"
chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf" "$rootfs/etc/hosts" \
    "$rootfs/etc/ssl/certs/ca-certificates.crt" "$rootfs/etc/berth/berth.toml"
chmod 0755 "$rootfs/etc/berth"
chmod 1777 "$rootfs/tmp"
chmod 0750 "$rootfs/var/lib/berth"
chmod 0700 "$rootfs/home/nonroot" "$rootfs/root"

if [[ -n $rootfs_only ]]; then
    echo "build-local: rootfs assembled in $rootfs (owners are set only in the image: everything"
    echo "             root:root except /var/lib/berth and /home/nonroot, 65532:65532)"
    exit 0
fi

# --- the image ----------------------------------------------------------------------------------
# Everything belongs to root except the cache dir and nonroot's home, which belong to 65532.
tarball=$work/rootfs.tar
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 \
    --exclude=./var/lib/berth --exclude=./home/nonroot -cf "$tarball" .
tar -C "$rootfs" --numeric-owner --owner=65532 --group=65532 --no-recursion \
    -rf "$tarball" ./var/lib/berth ./home/nonroot

docker_args=()
[[ -n ${DOCKER_HOST:-} ]] && docker_args=(-H "$DOCKER_HOST")
docker "${docker_args[@]}" import \
    --change 'USER 65532:65532' \
    --change 'WORKDIR /' \
    --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' \
    --change 'VOLUME ["/var/lib/berth"]' \
    --change 'EXPOSE 5000' \
    --change 'EXPOSE 9090' \
    --change 'ENTRYPOINT ["/usr/local/bin/berth"]' \
    --change 'CMD ["serve", "--config", "/etc/berth/berth.toml"]' \
    --message "berth built by tests/image/build-local.sh from $(basename "$binary")" \
    - "$tag" <"$tarball"
echo "build-local: imported $tag"
