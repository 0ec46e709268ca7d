"""`r1lab serve` and `r1lab chat`; only app.py and connections.py import FastAPI and uvicorn (the serve extra)."""
