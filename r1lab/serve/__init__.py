"""`r1lab serve`: an OpenAI-compatible HTTP API (with DeepSeek's `reasoning_content`) and a chat page.

Only the modules that need them import FastAPI and uvicorn (app.py, connections.py), so `r1lab.serve.reasoning`,
`.textstream`, `.prompts` and `.batcher` work with torch alone; the terminal chat (`r1lab chat`) uses them without a
server.
"""
