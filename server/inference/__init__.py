"""Inference: prompts in, deltas out -- what the completions and chat endpoints of both fronts share.

``prompts`` renders chat templates and tokenizes (bounded, off the event loop for long
inputs), ``generation`` prepares, admits and streams one request, ``tools`` turns a chat's
tools into constraints and its output back into tool calls.
"""
