"""HTTP load generator for gam-serve (TGI and OpenAI streaming APIs): closed and open loop, vLLM-comparable stats."""
