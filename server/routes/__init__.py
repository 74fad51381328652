"""HTTP routers: TGI (tgi.py), OpenAI (openai.py), health/info/tokenize/metrics (misc.py)."""
