"""An ETL-shaped DAG for the egress figures: extract 20,000 records (~1.6 MB as JSON), clean them,
aggregate, and publish a small summary."""
import datetime

from airflow.sdk import dag, task


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False, default_args={"queue": "q_bench_egress"})
def bench_egress():
    @task
    def extract() -> list:
        return [{"id": i, "customer": f"c{i % 977:04d}", "amount": round(i * 1.37 % 500, 2), "country": "DE"}
                for i in range(20_000)]

    @task
    def clean(rows: list) -> list:
        return [r for r in rows if r["amount"] > 1.0]

    @task
    def aggregate(rows: list) -> dict:
        totals: dict = {}
        for r in rows:
            totals[r["customer"]] = totals.get(r["customer"], 0) + r["amount"]
        return {"customers": len(totals), "top": sorted(totals.items(), key=lambda kv: -kv[1])[:5]}

    @task
    def publish(summary: dict) -> str:
        return f"{summary['customers']} customers"

    publish(aggregate(clean(extract())))


bench_egress()
