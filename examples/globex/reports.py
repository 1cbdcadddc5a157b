"""globex's nightly report: a flaky step that succeeds on its third attempt, then a fan of steps."""

from stepvisor import workflow


def fetch_rows(ctx):
    if ctx.attempt < 3:
        raise ConnectionError(f"warehouse busy (attempt {ctx.attempt})")
    return [{"region": r, "sales": 100 * (i + 1)} for i, r in enumerate(["eu", "us", "apac"])]


@workflow("nightly-report")
def nightly_report(event, step):
    rows = step.do(
        "fetch rows", fetch_rows, retries={"limit": 4, "delay": 0.2, "backoff": "linear"}
    )
    totals = {}
    for row in rows:
        totals[row["region"]] = step.do(
            f"score {row['region']}", lambda row=row: row["sales"] * event.payload["factor"]
        )
    return {"total": sum(totals.values()), "by_region": totals}
