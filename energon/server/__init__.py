"""Serving an Engine to other processes: `energon serve` (serve.py) with a ZeroMQ door
(zmq_door.py, messages in messages.py, client in client.py) and an OpenAI-compatible HTTP door
(http_door.py, openai_schema.py, chat.py), sharing one Frontend (frontend.py: limits, API key,
metrics.py, graceful drain). Nothing is imported here, so `import energon.server` stays light.
"""
