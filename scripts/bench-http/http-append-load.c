/* http-append-load.c — single-threaded epoll HTTP client: C connections, each
 * with one POST /streams/order-N in flight (one event per request), for S
 * seconds; prints requests/s.  Like redis-benchmark: one client thread.
 *   cc -O2 -o build/http-append-load scripts/bench-http/http-append-load.c
 *   build/http-append-load PORT CONNECTIONS SECONDS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
typedef struct { int fd; char buf[8192]; int got; long n; } C;
static int port;
static void sendreq(C *c, int id){ char body[256], req[1024]; int bl=snprintf(body,sizeof body,"{\"type\":\"OrderPlaced\",\"data\":{\"customer\":\"c-%d\",\"amount\":%ld,\"sku\":\"sku-1\"}}",id,c->n);
 int rl=snprintf(req,sizeof req,"POST /streams/order-%d HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",id,bl,body); write(c->fd,req,rl); }
int main(int argc,char**v){ port=atoi(v[1]); int nc=atoi(v[2]); double secs=atof(v[3]); int ep=epoll_create1(0); C *cs=calloc(nc,sizeof *cs);
 for(int i=0;i<nc;i++){ cs[i].fd=socket(AF_INET,SOCK_STREAM,0); struct sockaddr_in a={0}; a.sin_family=AF_INET;a.sin_port=htons(port);a.sin_addr.s_addr=htonl(0x7f000001); connect(cs[i].fd,(void*)&a,sizeof a); int one=1; setsockopt(cs[i].fd,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one); fcntl(cs[i].fd,F_SETFL,O_NONBLOCK); struct epoll_event e={EPOLLIN,{.u32=i}}; epoll_ctl(ep,EPOLL_CTL_ADD,cs[i].fd,&e); }
 double t0=now(); for(int i=0;i<nc;i++) sendreq(&cs[i],i); long total=0, bad=0; struct epoll_event evs[256];
 while(now()-t0<secs){ int n=epoll_wait(ep,evs,256,100); for(int k=0;k<n;k++){ int i=evs[k].data.u32; C *c=&cs[i]; int r=read(c->fd,c->buf+c->got,sizeof c->buf-c->got-1); if(r<=0){fprintf(stderr,"conn closed\n"); return 1;} c->got+=r; c->buf[c->got]=0;
   for(;;){ char *e=strstr(c->buf,"\r\n\r\n"); if(!e)break; char *cl=strcasestr(c->buf,"Content-Length:"); int L=cl?atoi(cl+15):0; int tot=(e-c->buf)+4+L; if(c->got<tot)break; if(strncmp(c->buf,"HTTP/1.1 201",12))bad++; memmove(c->buf,c->buf+tot,c->got-tot); c->got-=tot; c->n++; total++; sendreq(c,i);} } }
 double el=now()-t0; printf("epoll client: conns=%d requests=%ld rate=%.0f/s bad=%ld\n",nc,total,total/el,bad); return 0; }
