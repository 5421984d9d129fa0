"""``outpost scaler``: queue depth from the control plane's REST API, served to KEDA and Prometheus.

``settings`` (flags and ``OUTPOST_SCALER_*``), ``depth`` (the read-only REST client and its
credential), ``service`` (cache, rate limit, staleness) and ``server`` (``/scale``, ``/healthz``,
``/metrics``). It runs beside the workers, never inside one, and holds no worker credential.
"""

from airflow_outpost.worker.scaler.depth import QueueDepth, QueueDepthReader, TokenSource
from airflow_outpost.worker.scaler.server import ScalerServer
from airflow_outpost.worker.scaler.service import Scaler, Snapshot, Unavailable
from airflow_outpost.worker.scaler.settings import ScalerSettings, load_scaler_settings

__all__ = ["QueueDepth", "QueueDepthReader", "Scaler", "ScalerServer", "ScalerSettings", "Snapshot", "TokenSource",
           "Unavailable", "load_scaler_settings"]
