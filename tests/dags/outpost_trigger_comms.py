"""DAGs whose deferred tasks' triggers ask the control plane through the Task SDK's comms
(``outpost worker --triggers local``, no central triggerer): queue ``q_trigger_comms``.

``outpost_tc_upstream``: one quick task, what the others wait for. ``outpost_tc_external``: a
deferrable ``ExternalTaskSensor`` on it (``WorkflowTrigger``: task-instance counts), same logical
date. ``outpost_tc_trigger_run``: ``TriggerDagRunOperator(wait_for_completion=True, deferrable=True)``
(``DagStateTrigger``: DAG-run counts and states). ``outpost_tc_secrets``: a custom trigger reading
a Variable and a Connection. ``outpost_tc_xcom``: a custom trigger setting and reading an XCom.
``outpost_tc_asset_store``: a custom trigger using the asset state store of the task's outlet.
``outpost_tc_hitl``: an ``ApprovalOperator`` answered through the REST API (Airflow 3.3 parks it
``awaiting_input`` without a trigger; earlier lines defer it to ``HITLTrigger``), then a task after it.
"""
from __future__ import annotations

import datetime

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.providers.standard.sensors.external_task import ExternalTaskSensor
from airflow.sdk import Asset, BaseOperator, dag, task
from outpost_triggers import AssetStateStoreTrigger, ControlPlaneReadTrigger, XComRoundTripTrigger

ARGS = {"queue": "q_trigger_comms"}
START = datetime.datetime(2024, 1, 1)
STORE_ASSET = Asset(name="outpost_tc_store_asset", uri="file:///tmp/outpost_tc_store_asset")


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_upstream():
    @task
    def produce() -> str:
        return "produced"

    produce()


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_external():
    ExternalTaskSensor(task_id="wait_upstream", external_dag_id="outpost_tc_upstream", external_task_id="produce",
                       deferrable=True, poke_interval=1, timeout=180)


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_trigger_run():
    TriggerDagRunOperator(task_id="run_upstream", trigger_dag_id="outpost_tc_upstream", wait_for_completion=True,
                          deferrable=True, poke_interval=1)


class ReadOperator(BaseOperator):
    """Defers on :class:`ControlPlaneReadTrigger`; returns what the trigger read."""

    def execute(self, context):
        self.defer(trigger=ControlPlaneReadTrigger("outpost_tc_central_var", "outpost_tc_central_conn"),
                   method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return event


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_secrets():
    ReadOperator(task_id="read")


class XComOperator(BaseOperator):
    """Defers on :class:`XComRoundTripTrigger` for its own task; returns what the trigger read back."""

    def execute(self, context):
        ti = context["ti"]
        self.defer(trigger=XComRoundTripTrigger(ti.dag_id, ti.run_id, ti.task_id, ti.map_index),
                   method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return event


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_xcom():
    XComOperator(task_id="roundtrip")


class AssetStoreOperator(BaseOperator):
    """Defers on :class:`AssetStateStoreTrigger` for its outlet; returns what the trigger read."""

    def execute(self, context):
        self.defer(trigger=AssetStateStoreTrigger(STORE_ASSET.name), method_name="execute_complete")

    def execute_complete(self, context, event=None):
        return event


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_asset_store():
    AssetStoreOperator(task_id="store", outlets=[STORE_ASSET])


@dag(schedule=None, start_date=START, catchup=False, default_args=ARGS)
def outpost_tc_hitl():
    @task
    def after() -> str:
        return "approved"

    approve = ApprovalOperator(task_id="approve", subject="Ship it?", body="outpost trigger comms test")
    approve >> after()


outpost_tc_upstream()
outpost_tc_external()
outpost_tc_trigger_run()
outpost_tc_secrets()
outpost_tc_xcom()
outpost_tc_asset_store()
outpost_tc_hitl()
