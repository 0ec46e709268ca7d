"""How completions are judged: the tasks and their rule rewards, users' reward functions, language consistency, and
the code sandbox."""
