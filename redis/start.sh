#!/bin/sh
# Container entry: render the ACL file from the template with password hashes from the
# environment, then start Redis as the official image does, with the given options.
set -eu
sha() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
: "${REDIS_ADMIN_PASSWORD:?set REDIS_ADMIN_PASSWORD}"
: "${PRODUCER_PASSWORD:?set PRODUCER_PASSWORD}"
: "${CONSUMER_PASSWORD:?set CONSUMER_PASSWORD}"
acl=${ACL_FILE:-/tmp/users.acl}
sed -e "s/@REDIS_ADMIN_PASSWORD@/$(sha "$REDIS_ADMIN_PASSWORD")/" \
    -e "s/@PRODUCER_PASSWORD@/$(sha "$PRODUCER_PASSWORD")/" \
    -e "s/@CONSUMER_PASSWORD@/$(sha "$CONSUMER_PASSWORD")/" \
    "$(dirname "$0")/users.acl.template" | grep -v -e '^#' -e '^$' > "$acl"  # ACL files take no comments
[ "${RENDER_ONLY:-}" = 1 ] && exit 0
# A Cluster node (docker compose --profile cluster): its replicas sync from their master as the
# admin user. The password goes into a config file only this container reads, never on a command line.
if [ "${CLUSTER_NODE:-}" = 1 ]; then
  conf=${REPLICATION_CONF:-/tmp/replication.conf}
  umask 077
  printf 'masteruser admin\nmasterauth "%s"\n' "$REDIS_ADMIN_PASSWORD" > "$conf"
  exec docker-entrypoint.sh redis-server "$conf" --aclfile "$acl" "$@"
fi
exec docker-entrypoint.sh redis-server --aclfile "$acl" "$@"
