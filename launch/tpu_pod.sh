#!/usr/bin/env bash
# Runs one dpvl.main command on every worker of a Cloud TPU VM slice, creating the slice first
# if it does not exist.
#
#   bash launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator=TYPE --version=RUNTIME \
#       [--project=PROJECT] [--queued] [--spot] [--copy=PATH]... [--skip-setup] [--dry-run] \
#       -- DPVL_MAIN_ARGS...
#
#   bash launch/tpu_pod.sh --name=dpvl-v4-32 --zone=us-central2-b --accelerator=v4-32 \
#       --version=tpu-ubuntu2204-base -- --config=configs/dpcap_tiny.py --workdir=runs/dpcap_tiny
#
# Each step is one gcloud command, printed (one line, copy-pasteable) before it runs; --dry-run
# prints them and runs nothing:
#   1. `tpu-vm describe NAME || tpu-vm create NAME`: reuse the slice if it exists (it must be
#      READY and of the --accelerator type), otherwise create it. With --queued, a queued
#      resource NAME is created instead (unless it exists) and its `describe` is polled every
#      30 s until it is ACTIVE.
#   2. Setup (--skip-setup skips it): `mkdir -p dpvl` on every worker, `scp --recurse` of dpvl/,
#      configs/, setup.py, pyproject.toml and each --copy path (relative to the project root) to
#      ~/dpvl on every worker, then `pip install -e '.[tpu]'` there.
#   3. `ssh --worker=all --command='cd dpvl && DPVL_DISTRIBUTED=1 python3 -m dpvl.main ARGS'`:
#      the same command on every worker at once (DPVL_DISTRIBUTED=1: jax.distributed finds the
#      slice's workers itself), their output streamed here. Paths in ARGS (--config, --workdir) are
#      relative to ~/dpvl on the workers.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

# quote WORD [whole]: WORD as one shell word, as Python's shlex.quote writes it; of a
# --flag=VALUE word, only VALUE is quoted unless `whole` is given.
quote() {
  local word=$1 safe='^[A-Za-z0-9_@%+=:,./-]+$' flag='^(--[A-Za-z0-9_.-]+=)(.+)$'
  if [[ $word =~ $safe ]]; then
    printf '%s' "$word"
  elif [[ -z ${2:-} && $word =~ $flag ]]; then
    local name=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    printf '%s' "$name"
    quote "$value"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# words ARG...: the command line ARG... on one line, each word quoted.
words() {
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s\n' "${out[*]}"
}

# run ARG...: prints the command, then runs it (unless --dry-run).
run() {
  words "$@"
  if (( ! dry_run )); then "$@"; fi
}

name='' zone='' accelerator='' version='' project='' queued=0 spot=0 setup=1 dry_run=0
copies=()
while (( $# )); do
  case $1 in
    --) shift; break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --queued) queued=1 ;;
    --spot) spot=1 ;;
    --skip-setup) setup=0 ;;
    --name | --zone | --accelerator | --version | --project | --copy)
      (( $# >= 2 )) || die "$1 needs a value."
      set -- "$1=$2" "${@:3}"
      continue ;;
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator=*) accelerator=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --copy=*) copies+=("${1#*=}") ;;
    *) die "unknown option $1 (the dpvl.main arguments go after --; --help for usage)." ;;
  esac
  shift
done

missing=()
for flag in name zone accelerator version; do
  [[ -n ${!flag} ]] || missing+=("--$flag")
done
(( ${#missing[@]} == 0 )) || die "missing ${missing[*]} (--help for usage)."
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "--name=$name: use lowercase letters, digits and hyphens, starting with a letter."
(( $# )) || die "nothing to run: pass the dpvl.main arguments after --" \
  "(e.g. -- --config=configs/dpcap_tiny.py --workdir=runs/x)."

cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the project root: what is copied, and where
sources=(dpvl configs setup.py pyproject.toml ${copies[@]+"${copies[@]}"})
for path in "${sources[@]}"; do
  [[ -e $path ]] || die "$path: no such file or directory in $(pwd)."
done
for (( i = 1; i <= $#; i++ )); do
  arg=${!i} config=''
  if [[ $arg == --config=* ]]; then
    config=${arg#--config=}
  elif [[ $arg == --config ]] && (( i < $# )); then
    j=$((i + 1)); config=${!j}
  fi
  if [[ -n $config && ! -f ${config%%:*} ]]; then
    die "--config=$config: no such file in $(pwd) (paths are relative to the project root)."
  fi
done
if (( ! dry_run )) && ! command -v gcloud >/dev/null; then
  die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)."
fi

where=(--zone="$zone")
[[ -z $project ]] || where+=(--project="$project")
spot_flag=()
(( ! spot )) || spot_flag=(--spot)

# 1. The slice.
if (( queued )); then
  describe=(gcloud compute tpus queued-resources describe "$name" "${where[@]}"
            --format='value(state.state)')
  create=(gcloud compute tpus queued-resources create "$name" --node-id="$name" "${where[@]}"
          --accelerator-type="$accelerator" --runtime-version="$version"
          ${spot_flag[@]+"${spot_flag[@]}"})
else
  describe=(gcloud compute tpus tpu-vm describe "$name" "${where[@]}"
            --format='value(state,acceleratorType)')
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$version" ${spot_flag[@]+"${spot_flag[@]}"})
fi
echo "$(words "${describe[@]}") >/dev/null 2>&1 || $(words "${create[@]}")"
if (( ! dry_run )); then
  if info=$("${describe[@]}" 2>/dev/null); then
    echo "$name exists: reusing it ($info)." >&2
    if (( ! queued )); then
      read -r state type <<<"$info"
      [[ $type == "$accelerator" ]] \
        || die "$name is a $type, not a $accelerator: pick another --name or delete it."
      [[ $state == READY ]] \
        || die "$name is $state, not READY: start it, or delete it" \
               "(gcloud compute tpus tpu-vm delete $name ${where[*]})."
    fi
  else
    "${create[@]}"
  fi
  while (( queued )); do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING) die "queued resource $name is $state." ;;
      *) echo "queued resource $name: $state; waiting..." >&2; sleep 30 ;;
    esac
  done
fi

# 2. The project on every worker.
ssh=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all)
if (( setup )); then
  run "${ssh[@]}" --command='mkdir -p dpvl'
  run gcloud compute tpus tpu-vm scp "${sources[@]}" "$name:dpvl/" "${where[@]}" --worker=all \
    --recurse
  run "${ssh[@]}" --command='cd dpvl && python3 -m pip install -q -e ".[tpu]"'
fi

# 3. The same command on every worker.
run "${ssh[@]}" --command="cd dpvl && DPVL_DISTRIBUTED=1 python3 -m dpvl.main $(words "$@")"
