#!/usr/bin/env bash
# A Redis Cluster on loopback for development and tests.
#
#   scripts/redis-cluster.sh install
#       install redis-server (Debian's, 7.x) and libfaketime if missing
#   scripts/redis-cluster.sh up [--masters N] [--replicas R] [--dir DIR]
#       start N masters (default 3), each with R replicas (default 0), on
#       free loopback ports in DIR (default: a new temporary folder), create
#       the cluster, wait until every node reports cluster_state:ok, then print
#           TIERCAST_REDIS_DIR=<dir>
#           TIERCAST_REDIS_NODES=127.0.0.1:<port>,...   (the masters)
#   scripts/redis-cluster.sh down --dir DIR
#       stop exactly the processes started in DIR and remove it
#
# Every wait is bounded; nothing listens beyond 127.0.0.1.
set -euo pipefail

die() { echo "redis-cluster.sh: $*" >&2; exit 1; }

# libfaketime: the clock-skew test runs an edge with its wall clock moved.
FAKETIME_LIB=/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1

install() {
  local want=()
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    want+=(redis-server)
  fi
  [[ -e $FAKETIME_LIB ]] || want+=(libfaketime)
  [[ ${#want[@]} -eq 0 ]] && return
  echo "installing ${want[*]}" >&2
  if [[ $(id -u) -ne 0 ]]; then die "${want[*]} missing and this is not root: apt-get install ${want[*]}"; fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >&2
  # The package starts a system instance on 6379; the tests never use it.
  command -v redis-server >/dev/null || die "redis-server did not install"
  [[ -e $FAKETIME_LIB ]] || die "libfaketime did not install ($FAKETIME_LIB)"
}

# A port p such that p and p+10000 (the cluster bus) are both free. Both
# lie below the kernel's ephemeral range (32768 and up), so an outgoing
# connection cannot take one between this check and redis-server's bind.
free_port() {
  python3 - "$@" <<'PY'
import random, socket, sys
taken = set(int(p) for p in sys.argv[1:])
for _ in range(500):
    p = random.randint(10000, 19999)
    if p in taken or p + 10000 in taken:
        continue
    ok = True
    for port in (p, p + 10000):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            ok = False
        finally:
            s.close()
    if ok:
        print(p)
        sys.exit(0)
sys.exit("no free port pair found")
PY
}

wait_until() { # seconds, command...: true once the command succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || return 1
    sleep 0.1
  done
}

wait_for() { # seconds, description, command...
  local limit=$1 what=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if (( SECONDS >= deadline )); then die "timed out after ${limit}s waiting for $what"; fi
    sleep 0.1
  done
}

up() {
  local masters=3 replicas=0 dir=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --masters) masters=$2; shift 2 ;;
      --replicas) replicas=$2; shift 2 ;;
      --dir) dir=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  install
  [[ -n $dir ]] || dir=$(mktemp -d /tmp/tiercast-redis.XXXXXX)
  mkdir -p "$dir"
  local total=$((masters * (1 + replicas))) ports=() addrs=()
  # Clusters started at once (tests run in parallel) choose ports one after
  # the other: the lock is held from the choice until every server listens.
  exec 9>"${TMPDIR:-/tmp}/tiercast-redis-ports.lock"
  flock -w 60 9 || die "timed out waiting for the port lock"
  local attempt
  for attempt in 1 2 3; do
    ports=() addrs=()
    for _ in $(seq 1 "$total"); do
      local p; p=$(free_port "${ports[@]}")
      ports+=("$p")
    done
    for p in "${ports[@]}"; do
      mkdir -p "$dir/$p"
      redis-server --port "$p" --bind 127.0.0.1 --protected-mode no \
        --cluster-enabled yes --cluster-config-file "$dir/$p/nodes.conf" \
        --cluster-node-timeout 2000 --appendonly no --save "" \
        --dir "$dir/$p" --daemonize yes --pidfile "$dir/$p/redis.pid" \
        --logfile "$dir/$p/redis.log" >/dev/null 9>&-  # the lock stays ours
      echo "$p" >> "$dir/ports"
      addrs+=("127.0.0.1:$p")
    done
    local listening=1
    for p in "${ports[@]}"; do
      if ! wait_until 10 redis-cli -p "$p" ping; then listening=0; break; fi
    done
    (( listening )) && break
    # Someone bound a chosen port after all: stop what started, choose again.
    echo "redis-cluster.sh: a server did not start (port taken?); attempt $attempt of 3" >&2
    down --dir "$dir"
    mkdir -p "$dir"
    (( attempt < 3 )) || die "redis-server did not start on three sets of ports"
  done
  flock -u 9
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes >"$dir/create.log" 2>&1 \
    || { cat "$dir/create.log" >&2; die "cluster create failed"; }
  for p in "${ports[@]}"; do
    wait_for 20 "cluster_state:ok on $p" bash -c "redis-cli -p $p cluster info | grep -q cluster_state:ok"
  done
  # Replicas must have synced before a failover can be asked of them.
  if (( replicas > 0 )); then
    for p in "${ports[@]}"; do
      if redis-cli -p "$p" role | head -1 | grep -q slave; then
        wait_for 20 "replica $p in sync" bash -c "redis-cli -p $p info replication | grep -q master_link_status:up"
      fi
    done
  fi
  local seeds=()
  for p in "${ports[@]}"; do
    if redis-cli -p "$p" role | head -1 | grep -q master; then seeds+=("127.0.0.1:$p"); fi
  done
  echo "TIERCAST_REDIS_DIR=$dir"
  echo "TIERCAST_REDIS_NODES=$(IFS=,; echo "${seeds[*]}")"
}

down() {
  local dir=""
  while [[ $# -gt 0 ]]; do
    case $1 in
      --dir) dir=$2; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  [[ -n $dir ]] || dir=${TIERCAST_REDIS_DIR:-}
  [[ -n $dir && -f $dir/ports ]] || die "no cluster in '${dir}' (pass --dir)"
  while read -r p; do
    local pidfile="$dir/$p/redis.pid"
    if [[ -f $pidfile ]]; then
      local pid; pid=$(cat "$pidfile")
      # Only a redis-server we started: check the command line before killing.
      if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "redis-server.*:$p"; then
        kill "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 10))
        while kill -0 "$pid" 2>/dev/null && (( SECONDS < deadline )); do sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
      fi
    fi
  done < "$dir/ports"
  rm -rf "$dir"
}

cmd=${1:-}; shift || true
case $cmd in
  install) install ;;
  up) up "$@" ;;
  down) down "$@" ;;
  *) echo "usage: $0 install | up [--masters N] [--replicas R] [--dir DIR] | down --dir DIR" >&2; exit 2 ;;
esac
