#!/usr/bin/env bash
# The GPU check (about 5 minutes on one H100/H200): training of several methods under bf16 and fp16 with a partial
# last batch, torch.compile without recompiles (and the CUDA-graph mode), exact resume, host-device syncs per
# step, throughput against the bound at batch 64 and 512 (teacher BNs folded too), and export. Everything it
# prints goes to $RESULTS/smoke.log with the throughput JSON files next to it; commit that folder.
#   bash benchmarks/gpu_smoke.sh                      # on the GPU machine, from the repository root
#   DEVICE=cpu TINY=1 bash benchmarks/gpu_smoke.sh    # the flow on a CPU, small models (no compile sections)
set -euo pipefail
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
WORK=${WORK:-$(mktemp -d)}
if [[ "$TINY" == 1 ]]; then T=resnet20; S=resnet8; N=200; B=64; STEPS=3; else T=resnet32x4; S=resnet8x4; N=4000; B=64; STEPS=20; fi
SLUG=$(python -c "import torch, re; d = torch.cuda.get_device_name() if '$DEVICE'.startswith('cuda') else 'cpu'; print(re.sub('[^a-z0-9]+', '_', d.lower()).strip('_'))")
RESULTS=${RESULTS:-results/gpu/$SLUG}
mkdir -p "$RESULTS"
exec > >(tee "$RESULTS/smoke.log") 2>&1
SYN=(configs/synthetic/cifar_shape.yaml --set output_dir="$WORK" --set train.device="$DEVICE" --set train.progress=false
     --set data.synthetic.train_size=$N --set train.batch_size=$B)  # N % B != 0: the last batch is partial
KD=(--set teacher.name=$T --set teacher.checkpoint="$WORK/teacher" --set student.name=$S)
start=$(date +%s)
section() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }
last() { tail -n 1; }

section "environment"
python - <<'PY'
import torch, distillab
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, distillab {distillab.__version__}")
print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, bf16: {cuda and torch.cuda.is_bf16_supported()}")
PY

section "CUDA-only unit tests"
python -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | last || true

section "a teacher file, then methods under amp auto (bf16 on CUDA), channels-last, a partial last batch"
distillab train "${SYN[@]}" --set name=teacher --set student.name=$T --force | last
for m in kd fitnet dkd reviewkd rdr diffkd unikd; do
  distillab train "${SYN[@]}" "${KD[@]}" --set name=$m --set method.name=$m --set train.epochs=2 --force | last
done
distillab train "${SYN[@]}" "${KD[@]}" --set name=crd --set method.name=crd \
  --set method.options.num_negatives=128 --set data.synthetic.train_size=$((N > 1000 ? N : 1000)) --force | last

section "fp16 with the gradient scaler"
distillab train "${SYN[@]}" "${KD[@]}" --set name=kd_fp16 --set method.name=kd --set train.amp=fp16 --force | last

if [[ "$TINY" != 1 ]]; then
  section "torch.compile over 3 epochs: recompiles after the first compile (expected 0 per method)"
  for m in kd dkd rdr crd; do
    log="$WORK/${m}_compile.log"
    extra=(); [[ $m == crd ]] && extra=(--set method.options.num_negatives=128)
    TORCH_LOGS=recompiles distillab train "${SYN[@]}" "${KD[@]}" "${extra[@]}" --set name=${m}_compile \
      --set method.name=$m --set train.compile=true --set train.epochs=3 --force > "$log" 2>&1 \
      || { echo "$m: failed"; tail -n 20 "$log"; continue; }
    echo "$m: $(grep -c 'Recompiling' "$log" || true) recompiles; $(last < "$log")"
  done
  distillab train "${SYN[@]}" "${KD[@]}" --set name=kd_cudagraphs --set method.name=kd --set train.compile=true \
    --set train.compile_mode=reduce-overhead --set train.epochs=2 --force | last
fi

section "exact resume (train.deterministic): 2 epochs at once against 1 + 1"
DET=(--set method.name=kd --set train.deterministic=true)
distillab train "${SYN[@]}" "${KD[@]}" "${DET[@]}" --set name=full --set train.epochs=2 --force | last
distillab train "${SYN[@]}" "${KD[@]}" "${DET[@]}" --set name=split --set train.epochs=1 --force | last
distillab train --resume "$WORK/split" --set train.epochs=2 | last
python - "$WORK" <<'PY'
import sys
from safetensors.torch import load_file
a, b = (load_file(f"{sys.argv[1]}/{name}/student.safetensors") for name in ("full", "split"))
print("max |full - resumed| over the student's tensors:", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
PY

section "host-device syncs in 10 training steps"
python - "$DEVICE" "$T" "$S" <<'PY'
import sys, warnings
import torch
from rich.console import Console
from distillab import Trainer, methods, models
from distillab.config import SyntheticConfig, TrainConfig
from distillab.data.splits import synthetic

device, teacher, student = sys.argv[1:4]
data = synthetic(SyntheticConfig(num_classes=100, train_size=2048, test_size=64), 0)
for name in ["kd", "fitnet", "dkd", "rkd", "crd", "reviewkd", "rdr", "kr", "diffkd", "unikd", "dist", "at"]:
    options = {"crd": {"num_negatives": 1024}}.get(name, {})
    method = methods.build(name, models.build(student), models.build(teacher), **options)
    trainer = Trainer(method, data, TrainConfig(epochs=1, device=device, progress=False), console=Console(quiet=True))
    method.train()
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    for _ in range(3):
        trainer.train_step(next(batches), 0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        for _ in range(10):
            trainer.train_step(next(batches), 0.05)
        if device.startswith("cuda"):
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
    print(f"{name}: {len(syncs)} syncs", syncs[:1])
PY

section "throughput against the bound"
M=kd,fitnet,dkd,crd,reviewkd,rdr,diffkd,unikd
TP=(--device "$DEVICE" --teacher $T --student $S --steps $STEPS --repeats 2 --option crd.num_negatives=1024 --force)
distillab bench throughput "${TP[@]}" --methods $M --batch $B --output "$RESULTS/throughput_b$B.json" | tail -n 16
distillab bench throughput "${TP[@]}" --methods kd --batch $B --fold-teacher-bn --output "$RESULTS/throughput_b${B}_foldbn.json" | tail -n 9
if [[ "$TINY" != 1 ]]; then
  distillab bench throughput "${TP[@]}" --methods $M --batch 512 --output "$RESULTS/throughput_b512.json" | tail -n 16
  distillab bench throughput "${TP[@]}" --methods kd,dkd --batch $B --compile --output "$RESULTS/throughput_b${B}_compile.json" | tail -n 8
fi

section "export of a GPU-trained RDR student (merged) and its reload on the CPU"
distillab export "$WORK/rdr" --output "$WORK/rdr.safetensors" | last
python -c "from safetensors.torch import load_file; from distillab import models; m = models.build('$S'); print(m.load_state_dict(load_file('$WORK/rdr.safetensors')))"
section "done"
