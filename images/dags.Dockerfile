# A worker image with your DAGs and their Python dependencies, built on the outpost image.
#   docker build -f images/dags.Dockerfile --build-arg BASE=airflow-outpost:cpu -t my-outpost:dags /path/to/dag-repo
# The build context is your DAG repository: dags/ (the same files the control plane parses) and,
# optionally, requirements.txt (the packages those DAGs import on the worker).
ARG BASE=airflow-outpost:cpu
FROM ${BASE}
USER 0
COPY requirements.txt* /tmp/dags/
# Installed into the worker's venv, under the constraints the image was built with, so a DAG's
# requirement cannot silently replace a package the worker was tested with.
RUN if [ -f /tmp/dags/requirements.txt ]; then \
      /opt/outpost/bin/python -m pip install --no-cache-dir --constraint /opt/outpost/constraints.txt \
        -r /tmp/dags/requirements.txt; \
    fi \
    && rm -rf /tmp/dags
COPY --chown=10001:10001 dags/ /opt/dags/
USER 10001:10001
ENV OUTPOST_DAGS_FOLDER=/opt/dags
