from ctxvec.cli import main

main(prog_name="ctxvec")
