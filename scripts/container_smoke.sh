#!/usr/bin/env bash
# End-to-end container check, without a container registry: build the Bento, containerize it on a local
# Debian base image, run the image, and check that it serves /generate as a non-root user without CUDA.
#
#   bash scripts/container_smoke.sh          # as root (it installs docker.io/debootstrap and runs dockerd)
#
# What it does, in order (each step logs "== step" and its duration):
#   1. apt-installs docker.io (Debian's Docker 20.10 engine and client) and debootstrap when missing;
#   2. starts its own dockerd: data-root, exec-root, pidfile and socket in a temp dir, DOCKER_HOST set to it;
#   3. makes the base image localhost/debian-python:3.11 with debootstrap (no registry needed); the root
#      file system is cached as a tarball in $TEXTGEN_CONTAINER_CACHE (~/.cache/textgen-container), so a
#      rerun only imports it;
#   4. imports the model into a private BENTOML_HOME (`python -m textgen.import_model`) and builds the Bento
#      from a temporary bentofile: the repo's bentofile.yaml plus docker.base_image, with the PyTorch CPU
#      index (unreachable here) replaced by a find-links URL that serves the CPU torch wheel from this host;
#   5. `bentoml containerize` with the classic builder (DOCKER_BUILDKIT=0, host network for the build steps,
#      so that uv reaches the wheel server on 127.0.0.1 and the wheel never enters an image layer);
#   6. runs the image on 127.0.0.1 only, waits for /readyz, POSTs the old service's body to /generate;
#   7. checks the user is not root, that torch is the CPU build and the image has no CUDA libraries, that
#      the Bento carries the model; prints the image size and its layers;
#   8. runs the image a second time as deploy/deployment.yaml does (read-only root file system, uid 1034,
#      BENTOML_HOME in /tmp) and checks /readyz and /generate;
#   9. stops the container, then the daemon by PID, and removes the temp dir (also on failure or Ctrl-C).
#
# Needs: root, Python with scripts/install.sh done, the CPU torch wheel, PyPI and Debian mirrors.
# About 3.5 minutes from nothing on 2 cores, 1.5-2.5 minutes when the base root file system is cached.
#
# Environment knobs:
#   TEXTGEN_CONTAINER_CACHE   cache dir for the base root file system (default ~/.cache/textgen-container)
#   TEXTGEN_SMOKE_MODEL       source for `python -m textgen.import_model` (default: none = the offline default)
#   TORCH_WHEEL               the CPU torch wheel (default /opt/wheels/torch-2.13.0+cpu-cp311-...whl)
#   DEBIAN_MIRROR             debootstrap mirror (default http://deb.debian.org/debian)
#   READY_TIMEOUT             seconds to wait for /readyz (default 300)
#   KEEP_WORKDIR=1            keep the temp dir (Bento, logs) after the run
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CACHE_DIR=${TEXTGEN_CONTAINER_CACHE:-$HOME/.cache/textgen-container}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
READY_TIMEOUT=${READY_TIMEOUT:-300}
BASE_IMAGE=localhost/debian-python:3.11
IMAGE=textgen:smoke
SUITE=bookworm
# Debian's python3 is 3.11 on bookworm, the version of the build host and of the torch wheel (cp311).
# build-essential, git and gnupg2 are what BentoML's Dockerfile apt-installs for distro "debian" even on a
# custom base image (_bentoml_sdk/images.py, Image.__attrs_post_init__): having them already makes that
# step a no-op on reruns.
# python3-dev: Python's headers, which the official python images carry and torch.compile's generated C++
# needs (textgen/model/compiled.py).
BASE_PACKAGES=python3,python3-dev,python3-venv,python3-pip,ca-certificates,curl,build-essential,git,gnupg2
# Bump when the recipe of the base root file system changes, to invalidate the cached tarball.
BASE_RECIPE=3

T0=$(date +%s)
STEP_NAME=""
STEP_T0=$T0
TIMINGS=()
step() {
    step_done
    STEP_NAME=$1
    STEP_T0=$(date +%s)
    echo "== $STEP_NAME"
}
step_done() {
    if [ -n "$STEP_NAME" ]; then
        TIMINGS+=("$(printf '%5ss  %s' $(($(date +%s) - STEP_T0)) "$STEP_NAME")")
    fi
    STEP_NAME=""
}
die() {
    echo "FAILED${STEP_NAME:+ at step \"$STEP_NAME\"}: $*" >&2
    exit 1
}

# The script's own stdout/stderr: a trap runs with the redirections of the command it interrupted (e.g. the
# log file of `bentoml containerize`), and the cleanup must report to the terminal.
exec 3>&1 4>&2
WORK=""
DOCKERD_PID=""
WHEEL_SERVER_PID=""
CONTAINER=""
RO_CONTAINER=""
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    echo "== cleanup"
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
    fi
    for c in $CONTAINER $RO_CONTAINER; do
        docker rm -f "$c" >/dev/null 2>&1
    done
    if [ -n "$WHEEL_SERVER_PID" ]; then
        kill "$WHEEL_SERVER_PID" 2>/dev/null
        wait "$WHEEL_SERVER_PID" 2>/dev/null
    fi
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        kill -TERM "$DOCKERD_PID"
        for _ in $(seq 1 60); do
            kill -0 "$DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "dockerd $DOCKERD_PID did not stop in 30 s; killing it"
            kill -KILL "$DOCKERD_PID"
        fi
        wait "$DOCKERD_PID" 2>/dev/null
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # Mounts a killed daemon (or debootstrap) may have left behind, innermost first.
        awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do
            umount -l "$m"
        done
        if [ "${KEEP_WORKDIR:-0}" = 1 ]; then
            echo "kept $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    step_done
    if [ ${#TIMINGS[@]} -gt 0 ]; then
        echo "== timings"
        printf '%s\n' "${TIMINGS[@]}"
    fi
    if [ $rc -eq 0 ]; then
        echo "== container smoke test passed in $(($(date +%s) - T0)) s"
    else
        echo "== container smoke test FAILED (exit $rc) after $(($(date +%s) - T0)) s" >&2
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Long commands run in the background and are waited for: bash runs a trap only between commands, so a
# foreground `bentoml containerize` would hold off SIGTERM/SIGINT (and the cleanup) until it ends.
CHILD=""
run() {
    "$@" &
    CHILD=$!
    local rc=0
    wait "$CHILD" || rc=$?
    CHILD=""
    return $rc
}

free_port() {
    python - <<'EOF'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
EOF
}

# ---------------------------------------------------------------------------------------------------------
step "prerequisites"
[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages, starts dockerd and runs debootstrap"
python -c "import bentoml, textgen" 2>/dev/null || die "python cannot import bentoml/textgen: run scripts/install.sh first"
[ -f "$TORCH_WHEEL" ] || die "CPU torch wheel not found at $TORCH_WHEEL (set TORCH_WHEEL)"
missing=()
[ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
/usr/bin/docker --version

# dockerd's data root is in /tmp: the base image, the build's layers and the 2.3 GB image took up to 4.5 GB
# more on the disk (measured with the offline default model, SmolLM2-135M, session 22). Said now, not after
# the build.
free_mb=$(df -Pm /tmp | awk 'NR == 2 {print $4}')
if [ "$free_mb" -lt 5120 ]; then
    du -xsh /tmp/* 2>/dev/null | sort -h | tail -5 >&2
    die "only $free_mb MB free under /tmp; the container build needs about 5 GB (largest entries above)"
fi
echo "free under /tmp: $free_mb MB"
WORK=$(mktemp -d /tmp/textgen-container.XXXXXX)
mkdir -p "$WORK/bin" "$WORK/wheels" "$CACHE_DIR"
# BentoML runs `docker` from PATH: use Debian's 20.10 client, which matches the daemon and has the classic
# builder (the Docker 28 client in /usr/local/bin wants the buildx plugin, which is not installed).
ln -s /usr/bin/docker "$WORK/bin/docker"
export PATH="$WORK/bin:$PATH"
export DOCKER_HOST="unix://$WORK/docker.sock"
export DOCKER_BUILDKIT=0
export BENTOML_HOME="$WORK/bentoml"
export BENTOML_DO_NOT_TRACK=true

# ---------------------------------------------------------------------------------------------------------
step "start dockerd"
/usr/sbin/dockerd \
    --data-root "$WORK/docker" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    -H "$DOCKER_HOST" --storage-driver overlay2 >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -30 "$WORK/dockerd.log" >&2; die "dockerd exited"; }
    sleep 1
done
docker version --format 'dockerd {{.Server.Version}} (pid '"$DOCKERD_PID"'), storage driver '"$(docker info --format '{{.Driver}}' 2>/dev/null)" ||
    { tail -30 "$WORK/dockerd.log" >&2; die "dockerd did not answer within 60 s"; }

# ---------------------------------------------------------------------------------------------------------
step "base image $BASE_IMAGE"
# The tarball's name covers everything that goes into it, including this host's extra CA certificates
# (a TLS-inspecting egress proxy's CA must be trusted inside the build for PyPI to work).
ca_hash=$(cat /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-12)
key=$(printf '%s|%s|%s|%s|%s' "$BASE_RECIPE" "$SUITE" "$BASE_PACKAGES" "$DEBIAN_MIRROR" "$ca_hash" | sha256sum | cut -c1-16)
rootfs_tar="$CACHE_DIR/debian-$SUITE-python3.11-$key.tar"
if [ -f "$rootfs_tar" ]; then
    echo "cached root file system: $rootfs_tar"
else
    echo "debootstrap $SUITE (minbase + $BASE_PACKAGES) from $DEBIAN_MIRROR"
    rootfs="$WORK/rootfs"
    run timeout 900 debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$DEBIAN_MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    fi
    chroot "$rootfs" update-ca-certificates >/dev/null
    # BentoML's Dockerfile installs uv with `pip install` as root into the system Python; the official
    # python images have no PEP 668 marker either.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    # What the official debian:*-slim images do (python:3.11-slim, BentoML's default base, is one): keep apt
    # indexes compressed, skip translations and the binary package caches (BentoML's Dockerfile runs
    # `apt-get update` and never cleans up: 160 MB of indexes in the image without this), and leave
    # documentation, man pages and translations out (copyright files stay).
    cat >"$rootfs/etc/apt/apt.conf.d/docker-slim" <<'EOF'
Acquire::GzipIndexes "true";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    find "$rootfs/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    : >"$rootfs/etc/resolv.conf"
    rm -f "$CACHE_DIR"/debian-"$SUITE"-python3.11-*.tar  # older recipes
    run tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.part.$$" .
    mv "$rootfs_tar.part.$$" "$rootfs_tar"
    rm -rf "$rootfs"
fi
# uv (which BentoML's Dockerfile uses) must take Debian's Python rather than download one, and trust the
# system CA store; SSL_CERT_FILE does the same for Python's ssl.
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV UV_PYTHON_DOWNLOADS=never' \
    --change 'ENV UV_NATIVE_TLS=1' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' \
    "$rootfs_tar" "$BASE_IMAGE" >/dev/null
docker run --rm "$BASE_IMAGE" python3 --version

# ---------------------------------------------------------------------------------------------------------
step "import the model (BENTOML_HOME=$BENTOML_HOME)"
if [ -f textgen/import_model.py ]; then
    # The smoke test is offline: never wait on the Hugging Face Hub. No source = the offline default.
    run env HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" python -m textgen.import_model ${TEXTGEN_SMOKE_MODEL:+"$TEXTGEN_SMOKE_MODEL"} ||
        die "python -m textgen.import_model failed"
    bentoml models list
else
    echo "textgen/import_model.py does not exist yet: the Bento carries no model, the container resolves MODEL_NAME at start"
fi

# ---------------------------------------------------------------------------------------------------------
step "bentoml build"
WHEEL_PORT=$(free_port)
ln -s "$TORCH_WHEEL" "$WORK/wheels/"
python -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$WHEEL_PORT" >"$WORK/wheel-server.log" 2>&1 &
WHEEL_SERVER_PID=$!
python - "$REPO/bentofile.yaml" "$WORK/bentofile.yaml" "$BASE_IMAGE" "http://127.0.0.1:$WHEEL_PORT/" <<'EOF'
import sys

import yaml

source, target, base_image, wheels = sys.argv[1:]
with open(source) as f:
    config = yaml.safe_load(f)
config.setdefault("docker", {})["base_image"] = base_image
python = config.setdefault("python", {})
# The PyTorch CPU index is not reachable from this build; the same CPU wheel comes from this host instead.
# uv prefers it over PyPI's CUDA build of torch==2.13.0: 2.13.0+cpu is the higher version (PEP 440).
python.pop("extra_index_url", None)
python["find_links"] = [wheels]
with open(target, "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
echo "temporary bentofile:"
sed 's/^/    /' "$WORK/bentofile.yaml"
run bentoml build -f "$WORK/bentofile.yaml" -o tag "$REPO" >"$WORK/build.out" 2>"$WORK/build.log" ||
    { cat "$WORK/build.out" "$WORK/build.log" >&2; die "bentoml build failed"; }
build_out=$(cat "$WORK/build.out")
BENTO_TAG=$(printf '%s\n' "$build_out" | sed -n 's/^__tag__://p' | tail -1)
[ -n "$BENTO_TAG" ] || { cat "$WORK/build.log" >&2; die "bentoml build printed no tag: $build_out"; }
echo "built $BENTO_TAG"
bento_dir=$(bentoml get "$BENTO_TAG" -o path) || die "bentoml get $BENTO_TAG failed"
echo "models pinned in bento.yaml:"
if python - "$bento_dir/bento.yaml" <<'EOF'
import sys

import yaml

info = yaml.safe_load(open(sys.argv[1]))
for model in info.get("models") or []:
    print(f"    {model.get('tag')} (alias {model.get('alias')})")
sys.exit(0 if info.get("models") else 1)
EOF
then
    PINNED_MODEL=1
else
    PINNED_MODEL=""
    echo "    none"
fi
if [ -f textgen/import_model.py ] && [ -z "$PINNED_MODEL" ]; then
    die "the Bento pins no model although textgen.import_model exists (bentofile.yaml models: missing?)"
fi

# ---------------------------------------------------------------------------------------------------------
step "bentoml containerize"
# Host network for the RUN steps: uv reaches the wheel server on 127.0.0.1, PyPI and Debian as the host does.
run timeout 900 bentoml containerize "$BENTO_TAG" --backend docker -t "$IMAGE" --opt network=host \
    >"$WORK/containerize.log" 2>&1 || { tail -60 "$WORK/containerize.log" >&2; die "bentoml containerize failed"; }
grep -oE "Step [0-9]+/[0-9]+ : RUN .*" "$WORK/containerize.log" | cut -c1-150 || true
docker image inspect "$IMAGE" >/dev/null || die "containerize did not produce $IMAGE"
kill "$WHEEL_SERVER_PID" && wait "$WHEEL_SERVER_PID" 2>/dev/null || true
WHEEL_SERVER_PID=""

# ---------------------------------------------------------------------------------------------------------
step "run the container"
HOST_PORT=$(free_port)
CONTAINER=textgen-smoke-$$
docker run -d --name "$CONTAINER" -p "127.0.0.1:$HOST_PORT:3000" -e HF_HUB_OFFLINE=1 "$IMAGE" >/dev/null
URL="http://127.0.0.1:$HOST_PORT"
echo "waiting for $URL/readyz (up to $READY_TIMEOUT s)"
deadline=$(($(date +%s) + READY_TIMEOUT))
until curl -fsS -o /dev/null --max-time 5 "$URL/readyz" 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then
        docker logs --tail 80 "$CONTAINER" >&2
        die "the container exited (status $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")) before /readyz answered"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        docker logs --tail 80 "$CONTAINER" >&2
        die "/readyz did not answer 200 within $READY_TIMEOUT s"
    fi
    sleep 2
done
echo "ready after $(($(date +%s) - STEP_T0)) s"
docker logs "$CONTAINER" 2>&1 | grep -E "serving |WARNING|warning" | tail -5 || true

# ---------------------------------------------------------------------------------------------------------
step "POST /generate"
# The old service's body, as is: random seed, no template. A sampled reply may legitimately be empty (the
# offline default, SmolLM2-Instruct, sometimes ends at once with EOS on a raw prompt), so up to 5 tries;
# every reply must be a 200 of the right shape.
ok=""
for try in 1 2 3 4 5; do
    status=$(curl -sS -o "$WORK/generate.json" -w '%{http_code}' --max-time 120 "$URL/generate" \
        -H 'content-type: application/json' -d '{"prompt": "What is AI?", "max_new_tokens": 50}') ||
        die "POST /generate failed: curl could not complete the request"
    [ "$status" = 200 ] || { cat "$WORK/generate.json" >&2; docker logs --tail 40 "$CONTAINER" >&2; die "POST /generate answered $status"; }
    rc=0
    python - "$WORK/generate.json" "$try" <<'EOF' || rc=$?
import json
import sys

body = json.load(open(sys.argv[1]))
text = body.get("generated_text")
if not isinstance(text, str):
    print(f"no generated_text in {body}", file=sys.stderr)
    sys.exit(2)
print(f"try {sys.argv[2]}: 200 from model {body.get('model')!r}, finish_reason {body.get('finish_reason')!r}: {text[:200]!r}")
print(f"    usage {body.get('usage')}, timings {body.get('timings')}")
sys.exit(0 if text.strip() else 1)
EOF
    if [ $rc -eq 0 ]; then
        ok=1
        break
    fi
    [ $rc -eq 1 ] || die "POST /generate: the reply does not have the /generate shape"
done
[ -n "$ok" ] || die "POST /generate returned an empty generated_text 5 times"

# ---------------------------------------------------------------------------------------------------------
step "image checks"
# The worker allocates with tcmalloc (bentofile.yaml installs it; textgen/model/allocator.py preloads it).
allocator=$(curl -fsS --max-time 10 "$URL/info" | python -c "import json, sys; print(json.load(sys.stdin)['allocator'])")
echo "worker's allocator: $allocator"
[ "$allocator" = tcmalloc ] || die "the worker allocates with $allocator, not tcmalloc"
# A lone stream's decoding step compiles in the background after ready (bfloat16 CPUs; others say why not).
deadline=$(($(date +%s) + READY_TIMEOUT))
while compiled=$(curl -fsS --max-time 10 "$URL/info" | python -c "import json, sys; print(json.load(sys.stdin)['compiled_step'])") &&
    [ "$compiled" = compiling ] && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 2
done
echo "compiled decoding step: $compiled"
case "$compiled" in
    "compiled in "* | "loaded from the cache in "* | "off: float32 "* | "off: float32-packed "* | \
        "off: float32-int8head "* | "off: int8 "*) ;;
    *) docker logs --tail 40 "$CONTAINER" >&2; die "the decoding step did not compile: $compiled" ;;
esac
uid=$(docker exec "$CONTAINER" id -u)
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
echo "container runs as uid $uid (image USER ${user:-<unset>})"
[ "$uid" != 0 ] || die "the container runs as root"
# torch must be the CPU build, and no CUDA runtime may be in the image. (bentoml depends on nvidia-ml-py,
# pure-Python NVML bindings without any CUDA library: not a CUDA package.)
docker run --rm --user 0 --entrypoint /bin/sh "$IMAGE" -c '
    python -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)"
    ls /app/.venv/lib/python3*/site-packages | grep -i "^nvidia" | grep -iv "^nvidia_ml_py" | sed "s/^/CUDA package: /"
    echo "models in the image: $(ls /home/bentoml/bento/models 2>/dev/null | tr "\n" " ")"
    find / -xdev -regextype posix-extended -regex ".*/lib(cuda|cudart|cublas|cublasLt|cufft|curand|cusolver|cusparse|cudnn|nccl|nvrtc|nvJitLink|cupti|nvToolsExt)[^/]*\.so[^/]*" \
        -printf "CUDA library: %p\n"
' >"$WORK/cuda-check.txt" 2>&1 || { cat "$WORK/cuda-check.txt" >&2; die "could not inspect the image"; }
cat "$WORK/cuda-check.txt"
grep -q "^torch .*+cpu cuda None$" "$WORK/cuda-check.txt" || die "torch in the image is not the CPU build"
if grep -q "^CUDA " "$WORK/cuda-check.txt"; then
    die "the image contains CUDA packages or libraries"
fi
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
base_size=$(docker image inspect -f '{{.Size}}' "$BASE_IMAGE")
echo "image $IMAGE: $((size / 1000000)) MB (base $BASE_IMAGE: $((base_size / 1000000)) MB)"
docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | awk -F'\t' '$1 !~ /^0B$/ {print "    " $1 "\t" substr($2, 1, 110)}'

# ---------------------------------------------------------------------------------------------------------
step "run as deploy/deployment.yaml does"
# Read-only root file system, numeric non-root user, writable /tmp and ~/.cache only, BENTOML_HOME in /tmp
# (BentoML writes its client id, prometheus_multiproc_dir, ... under BENTOML_HOME at start-up).
RO_PORT=$(free_port)
RO_CONTAINER=textgen-smoke-ro-$$
docker run -d --name "$RO_CONTAINER" --read-only --user 1034:1034 --tmpfs /tmp --tmpfs /home/bentoml/.cache \
    -e BENTOML_HOME=/tmp/bentoml -e TEXTGEN_CACHE_DIR=/home/bentoml/.cache/textgen -e TEXTGEN_THREADS=2 \
    -e HF_HUB_OFFLINE=1 -p "127.0.0.1:$RO_PORT:3000" "$IMAGE" >/dev/null
deadline=$(($(date +%s) + READY_TIMEOUT))
until curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$RO_PORT/readyz" 2>/dev/null; do
    if [ "$(docker inspect -f '{{.State.Running}}' "$RO_CONTAINER")" != true ] || [ "$(date +%s)" -ge "$deadline" ]; then
        docker logs --tail 60 "$RO_CONTAINER" >&2
        die "the container did not become ready with a read-only root file system"
    fi
    sleep 2
done
status=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 120 "http://127.0.0.1:$RO_PORT/generate" \
    -H 'content-type: application/json' -d '{"prompt": "What is AI?", "max_new_tokens": 20}') || status=none
docker rm -f "$RO_CONTAINER" >/dev/null
RO_CONTAINER=""
[ "$status" = 200 ] || die "POST /generate answered $status with a read-only root file system"
echo "ready after $(($(date +%s) - STEP_T0)) s; POST /generate: 200"

# ---------------------------------------------------------------------------------------------------------
step "stop the container"
docker stop -t 30 "$CONTAINER" >/dev/null
echo "stopped in $(($(date +%s) - STEP_T0)) s (SIGTERM, then SIGKILL after 30 s), exit status $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")"
docker rm "$CONTAINER" >/dev/null
CONTAINER=""
