#!/usr/bin/env bash
# Device calls (after the 5 vLLM pack runs): `bash bench/gpu_colocated_run.sh bench`, then `... demo`.
# Every step prints its exit code; outputs go under $OUT.
set -u
export PYTHONPATH=/tmp/site:/tmp/raystub:$PWD VLLM_USE_DEEP_GEMM=0 PYTHONUNBUFFERED=1
mkdir -p /tmp/raystub/ray && touch /tmp/raystub/ray/__init__.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/device.txt
date -u | tee -a $OUT/device.txt
# The package installed as a user would on a machine without internet (no hand-made dist-info).
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/lc . > $OUT/pip-install.txt 2>&1
echo "pip install rc=$?" | tee -a $OUT/pip-install.txt
ls /tmp/lc | tee -a $OUT/pip-install.txt
export PYTHONPATH=/tmp/site:/tmp/raystub:/tmp/lc:$PWD
python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='vllm.endpoint_plugins')])" | tee -a $OUT/pip-install.txt
if [ "${1:-bench}" = bench ]; then
timeout 540 python3 bench/colocated_bench.py --sizes 8b --syncs 5 --out-dir $OUT > $OUT/colocated-8b.txt 2>&1
echo "colocated bench rc=$?" | tee -a $OUT/colocated-8b.txt; tail -25 $OUT/colocated-8b.txt
else
timeout 200 python3 -m rpc.tools.cli demo --scheme fp8_block --colocate true --steps 2 --json $OUT/demo-colocate.json > $OUT/demo-colocate.txt 2>&1
echo "demo colocate rc=$?" | tee -a $OUT/demo-colocate.txt; tail -20 $OUT/demo-colocate.txt
fi
