# lbr-ray image for KubeRay (clusters/kuberay/) and for Ray's launcher (`docker:` in clusters/aws.yaml, gcp.yaml).
#
#   docker build -t <registry>/lbr-ray:0.1.0 . && docker push <registry>/lbr-ray:0.1.0
#
# It is not built by lbr-ray's tests or CI (they run where there is no Docker engine), so build it once by hand
# before the first cluster run. The Ray version of the base image must equal the one of the machine that submits
# jobs (`ray --version`); Python 3.11 matches the project's venv.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

WORKDIR /home/ray/lbr-ray
# torch first (the CUDA wheel), then DeepSpeed built against it without JIT ops, as the Makefile does.
RUN pip install --no-cache-dir torch \
 && DS_BUILD_OPS=0 pip install --no-cache-dir --no-build-isolation deepspeed

# Only what lbr-ray needs (no .venv, runs/ or .git): code, configs, cluster specs, the bundled demo data.
COPY --chown=ray:users pyproject.toml README.md Makefile ./
COPY --chown=ray:users lbr_ray ./lbr_ray
COPY --chown=ray:users cli ./cli
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users clusters ./clusters
COPY --chown=ray:users data/demo ./data/demo
RUN pip install --no-cache-dir ".[gpu]" && lbr --help > /dev/null

ENV DS_BUILD_OPS=0
