"""The outpost worker: joins an Airflow 3 control plane over the Edge worker API and runs tasks through the Task SDK."""
