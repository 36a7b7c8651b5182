#!/bin/sh
# Bunch's Redis servers (redis.yaml) and Sentinels (redis-sentinel.yaml) run this, from the
# ConfigMap that kustomization.yaml generates out of this directory:
#
#   redis.sh redis-config     prints this Redis server's config (its init container)
#   redis.sh sentinel-config  prints this Sentinel's config (its init container)
#   redis.sh ready            exits 0 when this Redis server can serve: the primary, or a replica
#                             in sync with it (readiness: a rolling update waits for that)
#   redis.sh hand-over        on the primary, before it stops (preStop): pauses writes and has the
#                             Sentinels promote a replica at once, instead of 5 s of lost primary
#   redis.sh alive            exits 0 when this Redis server answers at all, loading its AOF included
#                             (liveness: a restart helps only a process that no longer answers)
#   redis.sh sentinel-alive   exits 0 when this Sentinel answers (its liveness and readiness)
#
# The config names the current primary: the one the Sentinels name (after a failover that is no
# longer redis-0), else the Redis server that says it is a master, else, when nothing answers (the
# set's very first start), the first of REDIS_NODES. A server starts as the primary only when it is
# the one so named; the others start as its replicas, and while no one is named they wait.
# https://redis.io/docs/latest/operate/oss_and_stack/management/sentinel/
#
# Environment (the manifests set it):
#   ANNOUNCE_HOST      this pod's stable DNS name (redis-0.redis, redis-sentinel-0.redis-sentinel)
#   REDIS_NODES        the Redis servers as host:port, space-separated, the first-start primary first
#   SENTINELS          the Sentinels as host:port, space-separated
#   REDIS_PASSWORD     every Redis server's requirepass and masterauth; the Sentinels' auth-pass
#   SENTINEL_PASSWORD  the Sentinels' own requirepass (empty or unset: none)
#   REDIS_PASSWORD_FILE, SENTINEL_PASSWORD_FILE
#                      files holding them instead (the Secret `redis-auth` mounted read-only, so the
#                      passwords are in no environment); a missing Sentinel password file means none
#   REDIS_PORT, SENTINEL_PORT  the ports this pod listens on (default 6379 and 26379)
set -eu
set -f # no globbing of the word-split replies below

here=$(dirname "$0")
redis_port=${REDIS_PORT:-6379}
sentinel_port=${SENTINEL_PORT:-26379}
if [ -n "${REDIS_PASSWORD_FILE:-}" ]; then
    REDIS_PASSWORD=$(cat "$REDIS_PASSWORD_FILE")
fi
sentinel_password=${SENTINEL_PASSWORD:-}
if [ -n "${SENTINEL_PASSWORD_FILE:-}" ] && [ -f "$SENTINEL_PASSWORD_FILE" ]; then
    sentinel_password=$(cat "$SENTINEL_PASSWORD_FILE")
fi
# The master name Bunch's BUNCH_REDIS_URL asks for, from the one place that sets it.
master=$(sed -n 's/^sentinel monitor \([^ ]*\) .*/\1/p' "$here/sentinel.conf")

# Passwords go into config files and BUNCH_REDIS_URL as they are: no quoting, no placeholders.
check_password() {
    case $2 in
    *replace-me* | *[!A-Za-z0-9._~-]*)
        echo "$1 must be a real password of letters, digits and . _ ~ - (openssl rand -hex 32)" >&2
        exit 1
        ;;
    esac
    if [ ${#2} -lt 16 ]; then
        echo "$1 must be 16 characters or more (openssl rand -hex 32)" >&2
        exit 1
    fi
}

# ask HOST:PORT PASSWORD COMMAND...: the reply, an item a line; nothing when nobody answers.
ask() {
    ask_address=$1 ask_password=$2
    shift 2
    set -- -h "${ask_address%:*}" -p "${ask_address##*:}" "$@"
    if [ -n "$ask_password" ]; then
        REDISCLI_AUTH=$ask_password timeout 3 redis-cli --no-auth-warning "$@" 2>/dev/null || true
    else
        timeout 3 redis-cli "$@" 2>/dev/null || true
    fi
}

# The primary the Sentinel at $1 names, as host:port (nothing if it names none).
named_by() {
    # shellcheck disable=SC2046 # the reply is two words: host and port
    set -- $(ask "$1" "$sentinel_password" sentinel get-master-addr-by-name "$master")
    if [ $# -eq 2 ] && [ -n "${2##*[!0-9]*}" ]; then
        echo "$1:$2"
    fi
}

# The current primary as host:port, nothing if no one knows.
find_primary() {
    for sentinel in $SENTINELS; do
        found=$(named_by "$sentinel")
        if [ -n "$found" ]; then
            echo "$found"
            return
        fi
    done
    for node in $REDIS_NODES; do
        if [ "$(ask "$node" "$REDIS_PASSWORD" role | head -n 1)" = master ]; then
            echo "$node"
            return
        fi
    done
}

# Until someone names the primary; `first` (if given) takes the role when no one does.
wait_for_primary() {
    while :; do
        found=$(find_primary)
        if [ -z "$found" ] && [ -n "${1:-}" ]; then
            found=$1
        fi
        if [ -n "$found" ]; then
            echo "$found"
            return
        fi
        echo "no Sentinel and no Redis server names a primary yet; asking again in 2 s" >&2
        sleep 2
    done
}

redis_config() {
    check_password REDIS_PASSWORD "$REDIS_PASSWORD"
    self=$ANNOUNCE_HOST:$redis_port
    first=${REDIS_NODES%% *}
    if [ "$self" = "$first" ]; then
        primary=$(wait_for_primary "$self")
    else
        primary=$(wait_for_primary)
    fi
    echo "primary: $primary" >&2
    cat "$here/redis.conf"
    echo
    echo "# Written by redis.sh for $self"
    echo "port $redis_port"
    echo "replica-announce-ip $ANNOUNCE_HOST"
    # masterauth on every server, the primary too: any of them may be a replica after a failover.
    echo "requirepass $REDIS_PASSWORD"
    echo "masterauth $REDIS_PASSWORD"
    if [ "$primary" != "$self" ]; then
        echo "replicaof ${primary%:*} ${primary##*:}"
    fi
}

sentinel_config() {
    check_password REDIS_PASSWORD "$REDIS_PASSWORD"
    [ -z "$sentinel_password" ] || check_password SENTINEL_PASSWORD "$sentinel_password"
    primary=$(wait_for_primary)
    echo "primary: $primary" >&2
    echo "port $sentinel_port"
    sed "s/@PRIMARY@/${primary%:*} ${primary##*:}/" "$here/sentinel.conf"
    echo
    echo "# Written by redis.sh for $ANNOUNCE_HOST:$sentinel_port"
    echo "sentinel announce-ip $ANNOUNCE_HOST"
    echo "sentinel auth-pass $master $REDIS_PASSWORD"
    # Every Sentinel has the same requirepass, and uses it to talk to the others as well.
    if [ -n "$sentinel_password" ]; then
        echo "requirepass $sentinel_password"
    fi
}

ready() {
    info=$(ask "127.0.0.1:$redis_port" "$REDIS_PASSWORD" info replication)
    case $info in
    *role:master* | *master_link_status:up*) ;;
    *)
        echo "not ready: ${info:-no answer}" >&2
        exit 1
        ;;
    esac
}

hand_over() {
    local_address=127.0.0.1:$redis_port
    self=$ANNOUNCE_HOST:$redis_port
    if [ "$(ask "$local_address" "$REDIS_PASSWORD" role | head -n 1)" != master ]; then
        return 0 # a replica just stops
    fi
    # No write lands here from now on, and once the replicas have acknowledged all the earlier ones
    # (they do every second) the replica promoted next has every write this primary accepted.
    # Briefly: the pause also holds up the Sentinels' commands here, so they would soon call it down.
    ask "$local_address" "$REDIS_PASSWORD" client pause 30000 write >/dev/null
    tries=0
    while [ $tries -lt 3 ]; do
        info=$(ask "$local_address" "$REDIS_PASSWORD" info replication | tr -d '\r')
        offset=$(echo "$info" | sed -n 's/^master_repl_offset://p')
        behind=$(echo "$info" | grep '^slave[0-9]*:' | grep -vc "offset=$offset," || true)
        if [ "$behind" = 0 ]; then
            break
        fi
        sleep 1
        tries=$((tries + 1))
    done
    for sentinel in $SENTINELS; do
        if [ "$(ask "$sentinel" "$sentinel_password" sentinel failover "$master")" = OK ]; then
            tries=0
            while [ $tries -lt 30 ]; do
                found=$(named_by "$sentinel")
                if [ -n "$found" ] && [ "$found" != "$self" ] &&
                    [ "$(ask "$found" "$REDIS_PASSWORD" role | head -n 1)" = master ]; then
                    echo "handed over to $found" >&2
                    return 0
                fi
                sleep 1
                tries=$((tries + 1))
            done
            break
        fi
    done
    ask "$local_address" "$REDIS_PASSWORD" client unpause >/dev/null
    echo "no Sentinel promoted a replica: stopping without a hand-over" >&2
}

# alive PORT PASSWORD: any answer to PING from the local server on PORT (LOADING, NOAUTH included).
alive() {
    if [ -z "$(ask "127.0.0.1:$1" "$2" ping)" ]; then
        echo "no answer on port $1" >&2
        exit 1
    fi
}

case ${1:-} in
redis-config) redis_config ;;
sentinel-config) sentinel_config ;;
ready) ready ;;
hand-over) hand_over ;;
alive) alive "$redis_port" "$REDIS_PASSWORD" ;;
sentinel-alive) alive "$sentinel_port" "$sentinel_password" ;;
*)
    echo "usage: $0 redis-config | sentinel-config | ready | hand-over | alive | sentinel-alive" >&2
    exit 2
    ;;
esac
