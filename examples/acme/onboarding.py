"""acme's onboarding workflow: durable steps, a sleep, and a wait for an external event."""

from stepvisor import NonRetryableError, workflow


def create_account(email: str) -> dict:
    if "@" not in email:
        raise NonRetryableError(f"not an email address: {email!r}")
    print(f"creating account for {email}")
    return {"account": email.split("@")[0], "plan": "trial"}


@workflow("onboard")
def onboard(event, step):
    email = event.payload["email"]
    account = step.do(
        "create account",
        lambda: create_account(email),
        retries={"limit": 3, "delay": 1, "backoff": "exponential"},
        timeout=30,
    )
    step.do("send welcome mail", lambda: print(f"mail to {email}: welcome!") or "sent")
    step.sleep("grace period", 1)
    answer = step.wait_for_event("confirm", type="email-confirmed", timeout="1 hour")
    return {"account": account, "confirmed_at": answer["payload"]["at"]}
