# Sourced by the GPU scripts: install the carried wheels (ray, deepspeed, datasets, ...) and set the environment.
# The GPU image has torch/transformers/peft but not ray/deepspeed; `bash ../shared/tools/device-wheels.sh` makes .whl/.
export TORCH_CUDA_ARCH_LIST=9.0 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0  # DeepSpeed's op builder cannot parse the image's "9.0a"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
export PYTHONPATH=$PWD/packages  # the GPU image does not have the project installed
if [ -d .whl ] && command -v nvidia-smi > /dev/null; then  # the GPU image lacks these; once per machine (parts side by side source this too)
  [ -f /tmp/site/.installed ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && touch /tmp/site/.installed; }
  export PYTHONPATH=/tmp/site:$PWD/packages PATH=/tmp/site/bin:$PATH
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -f /tmp/site/.checked ] && return 0  # the versions are printed once per machine (the import costs ~20 s a part)
python3 -c "import torch, transformers, deepspeed, ray, PIL; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'ray', ray.__version__, 'pillow', PIL.__version__, torch.cuda.device_count(), 'x', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" && mkdir -p /tmp/site && touch /tmp/site/.checked
