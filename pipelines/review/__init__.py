"""The review of a finished run by people: the decisions table, the rows it shows, and the web page over them."""
