from overfill_serve.tools.cli import main

main()
