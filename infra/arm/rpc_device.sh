#!/usr/bin/env bash
# The emulated aarch64 device: TVM's RPC server (python3.11 -m tvm.exec.rpc_server) run by the
# aarch64 Python that infra/arm/setup_device.sh prepares, under qemu-aarch64, on 127.0.0.1.
#
#   infra/arm/rpc_device.sh start|stop|status [port]     # port: 9190 (infra/devices.yaml's)
#
# start waits (at most $ARM_DEVICE_WAIT_S, 180 s) until the port accepts connections: the server
# imports tvm twice under emulation (itself and its worker), which takes about a minute.
# Pidfile and log: ${SHRINKFLOW_CACHE:-$HOME/.cache/shrinkflow}/devices/aarch64/rpc-<port>.{pid,log}
# Kernels get $SHRINKFLOW_ARM_THREADS threads (default 1: emulated threads share this machine's cores).
# Times measured on this device are emulated times (qemu on x86), never an ARM board's speed.
set -euo pipefail

CACHE=${SHRINKFLOW_CACHE:-$HOME/.cache/shrinkflow}/devices/aarch64
WRAPPER=$CACHE/bin/python3.11
HOST=127.0.0.1
cmd=${1:-}
PORT=${2:-9190}
WAIT_S=${ARM_DEVICE_WAIT_S:-180}
THREADS=${SHRINKFLOW_ARM_THREADS:-1}
PIDFILE=$CACHE/rpc-$PORT.pid
LOG=$CACHE/rpc-$PORT.log

usage() { echo "usage: $0 start|stop|status [port]   (port default 9190)" >&2; exit 2; }
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -gt 0 ] && [ "$PORT" -lt 65535 ] || usage

accepts() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }
server_pid() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  local pid waited=0
  if pid=$(server_pid); then
    if accepts; then
      echo "rpc_device: already running on $HOST:$PORT (pid $pid, log $LOG)"
      return 0
    fi
    echo "rpc_device: pid $pid (from $PIDFILE) is running but $HOST:$PORT does not accept yet; waiting"
  else
    [ -x "$WRAPPER" ] || {
      echo "rpc_device: $WRAPPER is missing: run infra/arm/setup_device.sh (or make arm-device) first" >&2
      exit 1
    }
    if accepts; then
      echo "rpc_device: $HOST:$PORT is already taken by another program; pick another port: $0 start <port>" >&2
      exit 1
    fi
    rm -f "$PIDFILE"
    # A session of its own (setsid), so stop ends the server, its worker and their children together.
    # --port-end PORT+1: the server fails rather than quietly binding another port.
    TVM_NUM_THREADS=$THREADS TVM_BIND_THREADS=0 setsid "$WRAPPER" -m tvm.exec.rpc_server \
      --host "$HOST" --port "$PORT" --port-end "$((PORT + 1))" >"$LOG" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$PIDFILE"
    echo "rpc_device: started the emulated aarch64 TVM RPC server (qemu-aarch64, pid $pid, $THREADS thread(s)) on $HOST:$PORT; log $LOG"
  fi
  until accepts; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      echo "rpc_device: the server exited before listening on $HOST:$PORT; last lines of $LOG:" >&2
      tail -n 20 "$LOG" >&2 || true
      exit 1
    fi
    if [ "$waited" -ge "$WAIT_S" ]; then
      echo "rpc_device: $HOST:$PORT does not accept connections after ${WAIT_S}s; stopping it. Last lines of $LOG:" >&2
      tail -n 20 "$LOG" >&2 || true
      stop >/dev/null
      exit 1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  echo "rpc_device: ready on $HOST:$PORT after ${waited}s (times measured on it are emulated, not ARM hardware speed)"
}

stop() {
  local pid i
  if ! pid=$(server_pid); then
    rm -f "$PIDFILE"
    echo "rpc_device: not running on port $PORT"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
  echo "rpc_device: stopped the server on $HOST:$PORT (pid $pid)"
}

status() {
  local pid
  if pid=$(server_pid); then
    if accepts; then
      echo "rpc_device: running on $HOST:$PORT (pid $pid, log $LOG)"
    else
      echo "rpc_device: starting (pid $pid) but $HOST:$PORT does not accept connections yet; log $LOG"
    fi
    return 0
  fi
  echo "rpc_device: not running on port $PORT"
  return 3
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
