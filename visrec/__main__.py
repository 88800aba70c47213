from visrec.cli import app

app(prog_name="visrec")
