#!/usr/bin/env bash
# GPU smoke test (<= 5 minutes on one H200-class GPU): the code paths of the `gpu` profile, with numbers.
#   1. CUDA grouped_mm vs the per-expert loop: Switch forward + backward agree (fp32 and bf16), and their time;
#   2. one short sweep (profile gpu_smoke: TopK, ReLU, Gated, fixed-width Switch-16, FLOP-matched Switch-2;
#      300 steps x 8192 tokens, bf16 autocast) on offline SmolLM2 activations extracted on the GPU;
#   3. notebook 00 executed on the GPU kernel (SWITCH_SAE_PROFILE=gpu_smoke).
# Prints every number it measures; writes outputs under outputs/gpu_smoke/. Run the whole `gpu` profile after
# it with: switch-sae reproduce --profile gpu
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys, time, torch
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: no CUDA device visible to torch (torch.cuda.is_available() is False); "
             "install a CUDA build of torch (TORCH_SPEC=torch bash scripts/setup.sh) on a GPU machine")
from switch_sae_core import ops
from switch_sae_core.config import SAEConfig
from switch_sae_core.saes.base import build_sae
print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
torch.manual_seed(0)
cfg = SAEConfig(arch="switch", d_in=576, n_features=18432, n_experts=16, k=32)
x = torch.randn(8192, 576, device="cuda") * 10
for dtype in (torch.float32, torch.bfloat16):
    grads, times = {}, {}
    for fast in (True, False):
        sae = build_sae(cfg).cuda()
        torch.manual_seed(1); sae.load_state_dict(build_sae(cfg).state_dict())
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for rep in range(4):  # the last 3 timed
                torch.cuda.synchronize(); t0 = time.perf_counter()
                out = sae(x, fast=fast)
                loss = (out.x_hat.float() - x).pow(2).sum(-1).mean()
                sae.zero_grad(); loss.backward(); torch.cuda.synchronize()
                times.setdefault(fast, []).append(time.perf_counter() - t0)
        grads[fast] = sae.W_enc.grad.float().clone() if sae.W_enc.grad is not None else None
    rel = ((grads[True] - grads[False]).norm() / grads[False].norm()).item()
    print(f"switch-16 fwd+bwd {str(dtype):15s} fast {1e3 * min(times[True][1:]):.2f} ms | loop "
          f"{1e3 * min(times[False][1:]):.2f} ms | W_enc grad rel. diff {rel:.2e}")
    assert rel < (1e-4 if dtype == torch.float32 else 5e-2), "fast and loop paths disagree"
PY
export SWITCH_SAE_PROFILE=gpu_smoke
t0=$(date +%s)
switch-sae sweep --profile gpu_smoke
echo "sweep (extraction included): $(( $(date +%s) - t0 )) s"
t1=$(date +%s)
python -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=600 notebooks/00_quickstart.ipynb
echo "notebook 00 on the GPU: $(( $(date +%s) - t1 )) s"
python - <<'PY'
from switch_sae_core.profiles import get_profile
from switch_sae_core.results import profile_records
for r in profile_records(get_profile("gpu_smoke")):
    print(f"{r['name']:28s} mse {r['mse']:9.1f}  L0 {r['l0']:6.1f}  loss rec. {r['loss_recovered']}  "
          f"train {r['train_seconds']:.1f} s ({1e3 * r['train_seconds'] / r['steps']:.2f} ms/step)")
PY
