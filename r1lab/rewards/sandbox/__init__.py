"""The code sandbox: the OS boundary that runs model-written programs (runner), the program inside it (child), and
the judge of test results."""
