# paircurate worker and launcher image (Dataflow custom container, Runner v2).
# The base is Beam's Python SDK image for the pinned Beam version; its
# entrypoint (/opt/apache/beam/boot) is what Dataflow workers start.
FROM apache/beam_python3.11_sdk:2.77.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=0 \
    NO_ALBUMENTATIONS_UPDATE=1

WORKDIR /opt/paircurate
COPY pyproject.toml README.md ./
COPY pipeline/ pipeline/
COPY transforms/ transforms/
COPY configs/ configs/

# PyPI's Linux x86_64 torch wheels carry CUDA; the NVIDIA driver comes from the
# Dataflow GPU worker (install_nvidia_driver service option).
# The project itself is installed from this source tree; its requirements carry version ranges.
# hadolint ignore=DL3013
RUN pip install ".[gcp]" \
 && python -c "import paircurate.cli, apache_beam, torch, open_clip; print('paircurate image ok')"
