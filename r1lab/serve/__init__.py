"""`r1lab serve` and `r1lab chat`. Only app.py and connections.py import FastAPI and uvicorn: the rest works with torch
alone, for the terminal chat."""
