"""The `esp` command line. Each subcommand lives in its own module here and imports heavy
libraries (TensorFlow, Beam, the Pub/Sub client) only inside the command body, so `esp --help`
stays fast."""
