"""Reading the toy world's sessions."""


def session_text(session: dict) -> str:
    """Everything said in a session, user and assistant, in order."""
    return " ".join(m["content"] for m in session["messages"])
