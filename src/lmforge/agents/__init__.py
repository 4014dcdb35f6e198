"""Tool-using agents: the ReAct loop, its tools, and the fences that keep tool output data."""
