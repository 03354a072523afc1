export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c 'import torch;print(torch.__version__, torch.cuda.device_count())'
t0=$SECONDS
CMAKE_BUILD_PARALLEL_LEVEL=32 python3 -m pip install --no-build-isolation --no-deps . > $OUT/install.log 2>&1 || { tail -60 $OUT/install.log; exit 1; }
echo "install $((SECONDS-t0)) s"; python3 -c "import flashep._C as C; print('nvshmem built', C.nvshmem_built())"
export FLASHEP_TEST_EXPECT_GPUS=2 FLASHEP_TEST_EXPECT_NVSHMEM=1
timeout 420 python3 -m pytest -q -s -rfEs tests/python/test_foundation.py > $OUT/foundation.log 2>&1; echo "foundation rc=$? $((SECONDS-t0)) s"
grep -E "passed|failed|Error|FAILED|MISMATCH|rank 0:|ok " $OUT/foundation.log | tail -40
FLASHEP_TEST_QUICK=1 timeout 300 python3 -m pytest -x -q -s -rfEs tests/python/test_intranode.py -k R2 > $OUT/intranode.log 2>&1; echo "intranode rc=$? $((SECONDS-t0)) s"
grep -E "case|passed|failed|MISMATCH|Error" $OUT/intranode.log | tail -40
