"""Multi-turn tool use: a single-turn reader can skip this package.

tools.py      tool callables and environments, ``AgentConfig`` (``model.sampling.agent``)
formats.py    how a model writes a tool call: tags (Search-R1) or the chat template's tool calls
episodes.py   the multi-turn loop: sample, run the calls, insert their results, continue
retrieval.py  the BM25 search environment (Search-R1-style QA)
openenv.py    OpenEnv environments (reset / step) driving the turns: the model's turns are their actions
"""
