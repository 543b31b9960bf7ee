"""What a DFA search leaves in its run directory (the search itself is the `dfa_search` method, a stage of `dfa`)."""
