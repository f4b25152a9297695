# recsketch's Airflow image: Python 3.11, the pinned lock, the library, VGG16's weights.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow KERAS_HOME=/opt/keras
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/recsketch
COPY requirements.txt .
# torch's CPU wheel: the lock pins torch==2.13.0 without CUDA packages
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt
COPY pyproject.toml ./
COPY recsketch ./recsketch
RUN pip install --no-deps .
# the DAG bundle: the same DAGs and plugins on every host (no shared folder)
COPY dags ./dags
COPY plugins ./plugins
COPY tools/airflow_maintenance.py ./tools/
# VGG16 ImageNet weights (no top) into Keras' cache at build time, so workers run offline
RUN mkdir -p "$KERAS_HOME/models" && curl -fsSL -o "$KERAS_HOME/models/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" \
    https://storage.googleapis.com/tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5
RUN useradd --create-home --uid 50000 airflow && mkdir -p /opt/airflow \
    && chown -R airflow /opt/airflow "$KERAS_HOME"
USER airflow
WORKDIR /opt/airflow
