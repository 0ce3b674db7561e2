"""ftpproxy: the FTP/FTPS proxy (registry name ``ftp``: ftpproxy.server.FtpProxy); see docs/ftp.md."""
