#!/usr/bin/env bash
# Build the newest Redis >= 8.6 (with TLS) from Debian's experimental source package into a cache outside
# the repository (reused when already built); print the path of its redis-server on stdout.
# Uses a private apt configuration: /etc/apt is never touched. Needs gcc, g++ and make
# (installed with apt-get when missing and allowed). Set REDIS8_CACHE to move the cache.
set -euo pipefail
cache=${REDIS8_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/orders-redis8}
min_major=8 min_minor=6
say() { echo "redis-8.sh: $*" >&2; }

at_least_8_6() {  # VERSION like 8.6.3
  local major minor
  IFS=. read -r major minor _ <<<"$1"
  [ "${major:-0}" -gt "$min_major" ] || { [ "${major:-0}" -eq "$min_major" ] && [ "${minor:-0}" -ge "$min_minor" ]; }
}

# One build at a time: a second caller waits, then reuses the first one's build.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# A build from an earlier run: the newest one that still starts.
for server in $(ls -d "$cache"/redis-*-tls/src/redis-server 2>/dev/null | sort -V -r); do
  version=$("$server" --version 2>/dev/null | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
  if [ -n "$version" ] && at_least_8_6 "$version"; then
    say "reusing Redis $version built in $(dirname "$(dirname "$server")")"
    echo "$server"
    exit 0
  fi
done

need=()
for tool in gcc g++ make; do command -v "$tool" >/dev/null || need+=("$tool"); done
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)  # the tests run Redis over TLS too
command -v apt-get >/dev/null || { say "needs apt-get (Debian) to fetch the source package"; exit 1; }
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { say "needs ${need[*]}: apt-get install gcc g++ make libssl-dev"; exit 1; }
  say "installing ${need[*]} with apt-get"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc g++ make libssl-dev >/dev/null
fi

# The machine's own Debian mirror, from its apt sources.
mirror=$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
  | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || { say "no Debian keyring at $keyring (apt-get install debian-archive-keyring)"; exit 1; }

apt_dir=$(mktemp -d "$cache/apt.XXXXXX")
trap 'rm -rf "$apt_dir"' EXIT
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$apt_dir/src"
echo "deb-src [signed-by=$keyring] ${mirror%/} experimental main" > "$apt_dir/sources.list"
cat > "$apt_dir/apt.conf" <<CONF
Dir::Etc::SourceList "$apt_dir/sources.list";
Dir::Etc::SourceParts "$apt_dir/parts";
Dir::State::Lists "$apt_dir/lists";
Dir::Cache "$apt_dir/cache";
CONF
export APT_CONFIG=$apt_dir/apt.conf
say "fetching the redis source package from ${mirror%/} experimental"
apt-get update -qq -o APT::Sandbox::User=root >/dev/null
(cd "$apt_dir/src" && apt-get source --download-only -qq -o APT::Sandbox::User=root redis >/dev/null)
dsc=$(ls "$apt_dir"/src/redis_*.dsc 2>/dev/null | head -n 1)
[ -n "$dsc" ] || { say "no redis source package found in experimental"; exit 1; }
version=$(sed -n 's/^Version: \(.*:\)\{0,1\}\([0-9.]*\).*/\2/p' "$dsc" | head -n 1)
if ! at_least_8_6 "$version"; then
  say "experimental has Redis $version, older than $min_major.$min_minor: refusing it"
  exit 1
fi
orig=$(ls "$apt_dir"/src/redis_"$version"*.orig.tar.* | head -n 1)
say "building Redis $version with TLS from $(basename "$orig") (one to two minutes on 2 cores)"
target="$cache/redis-$version-tls"
rm -rf "$target" "$target.tmp"
mkdir -p "$target.tmp"
tar -xf "$orig" -C "$target.tmp" --strip-components=1
make -C "$target.tmp" -j"$(nproc)" USE_SYSTEMD=no BUILD_TLS=yes >"$apt_dir/build.log" 2>&1 || {
  tail -n 20 "$apt_dir/build.log" >&2; say "build failed"; exit 1; }
mv "$target.tmp" "$target"
built=$("$target/src/redis-server" --version | sed -n 's/.* v=\([0-9.]*\).*/\1/p')
at_least_8_6 "$built" || { say "built redis-server says $built"; exit 1; }
say "built Redis $built in $target"
echo "$target/src/redis-server"
