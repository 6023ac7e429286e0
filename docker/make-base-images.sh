#!/usr/bin/env bash
# Makes the base images the Dockerfiles start from, on a machine whose Docker engine cannot
# pull from a registry: a Debian bookworm root made with debootstrap and loaded with
# `docker import`, tagged with the names the Dockerfiles use.
#
#   sudo bash docker/make-base-images.sh            # debian:bookworm-slim and rust:<ver>-slim-bookworm
#
# * debian:bookworm-slim: debootstrap --variant=minbase bookworm, plus ca-certificates and
#   curl (the runtime image's HEALTHCHECK uses curl; the official image would install it).
# * rust:<ver>-slim-bookworm: the same root plus gcc/g++ (tokenizers builds C++) and this
#   machine's Rust toolchain copied in under /usr/local/{rustup,cargo}, the layout of the
#   official rust image, so the Dockerfile is the same one a machine with a registry runs.
#
# Where a registry is reachable, skip this script: `docker build` pulls the official images.
# Idempotent: an image that already exists is kept (FORCE=1 remakes it).
set -euo pipefail

MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK="${WARM_BASE_WORK:-/tmp/warm-base-images}"
RUST_VERSION="$(rustc --version | awk '{print $2}')"
RUST_TAG="rust:${RUST_VERSION%.*}-slim-bookworm"
TOOLCHAIN="$(rustc --print sysroot)"

have_image() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

make_root() { # folder, extra packages
  local root="$1" include="$2"
  if [ ! -f "$root/.done" ]; then
    rm -rf "$root"
    debootstrap --variant=minbase --include="$include" bookworm "$root" "$MIRROR"
    # Keep the images small: no apt lists or caches, as the official slim images.
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
      "$root"/usr/share/man/* "$root"/usr/share/locale/*
    touch "$root/.done"
  fi
}

import_root() { # folder, tag, docker import --change lines...
  local root="$1" tag="$2"; shift 2
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  tar --exclude=./.done -C "$root" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  echo "made $tag ($(docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
}

mkdir -p "$WORK"

if have_image debian:bookworm-slim; then
  echo "debian:bookworm-slim exists"
else
  make_root "$WORK/runtime" ca-certificates,curl
  import_root "$WORK/runtime" debian:bookworm-slim 'CMD ["bash"]'
fi

if have_image "$RUST_TAG"; then
  echo "$RUST_TAG exists"
else
  make_root "$WORK/builder" ca-certificates,curl,gcc,g++,libc6-dev,make,pkg-config
  if [ ! -f "$WORK/builder/usr/local/cargo/bin/cargo" ]; then
    mkdir -p "$WORK/builder/usr/local/rustup/toolchains" "$WORK/builder/usr/local/cargo/bin"
    name="$(basename "$TOOLCHAIN")"
    cp -a "$TOOLCHAIN" "$WORK/builder/usr/local/rustup/toolchains/$name"
    # Docs and sources are not needed to build.
    rm -rf "$WORK/builder/usr/local/rustup/toolchains/$name/share/doc" \
      "$WORK/builder/usr/local/rustup/toolchains/$name/lib/rustlib/src"
    for tool in cargo rustc rustdoc; do
      ln -sf "/usr/local/rustup/toolchains/$name/bin/$tool" "$WORK/builder/usr/local/cargo/bin/$tool"
    done
  fi
  import_root "$WORK/builder" "$RUST_TAG" \
    'ENV PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    'ENV RUSTUP_HOME=/usr/local/rustup' 'ENV CARGO_HOME=/usr/local/cargo' "ENV RUST_VERSION=$RUST_VERSION" \
    'CMD ["bash"]'
fi
