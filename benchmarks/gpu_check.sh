#!/usr/bin/env bash
# On a machine with a GPU: the step benchmark (torch, JAX) and the tests
# that exercise the update on a device (conformance matrix, fast paths,
# skip_nonfinite, update rule, anchors), on torch and JAX. Logs and JSON
# tables go to $OUT (default /tmp/gpu_check); a summary is printed last.
#
#   bash benchmarks/gpu_check.sh        # from the repository root
#
# Where keras is not installed, wheels of keras, namex and optree put in
# .whl/ are installed into /tmp/site first. Each part has its own time
# limit (seconds, overridable: T_TORCH, T_FIT, T_JAX, T_TESTS), so that a
# slow part leaves the others their results.
set -u
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version \
  --format=csv | tee "$out/gpu.txt"
python3 -c "import keras, jax, torch, optax; print('keras', keras.__version__,
'jax', jax.__version__, jax.devices(), 'torch', torch.__version__,
torch.cuda.get_device_name(), 'optax', optax.__version__)" 2>&1 | tail -1

bench() {  # name, limit, arguments of step_time.py
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 benchmarks/step_time.py --repeats 20 \
    --json "$out/$name.json" "$@" >"$out/$name.log" 2>&1
  echo "$name rc=$?"
}
bench torch_steps "${T_TORCH:-80}" --backend torch --no-fit
bench torch_fit "${T_FIT:-50}" --backend torch --no-steps
for case in "100M x 1" "100M x 200" "100M x 1000"; do
  bench "jax_${case// /}" "${T_JAX:-70}" --backend jax --no-fit --case "$case"
done

tests="tests/test_conformance.py tests/test_fast_paths.py
tests/test_skip_nonfinite.py tests/test_update_rule.py tests/test_anchors.py"
for b in torch jax; do
  (KERAS_BACKEND=$b timeout "${T_TESTS:-140}" python3 -m pytest -q \
     -p no:cacheprovider -n 7 $tests >"$out/tests_$b.log" 2>&1
   echo "tests $b rc=$?" >>"$out/tests_$b.log") &
done
wait

for f in "$out"/torch_*.log "$out"/jax_*.log; do
  [ -f "$f" ] || continue
  grep -E "^\| [0-9]|^model.fit|^## " "$f" | grep -v "^| case"
done
for b in torch jax; do
  grep -E "passed|failed|error|rc=" "$out/tests_$b.log" | tail -3
done
